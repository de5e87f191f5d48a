"""`python -m distnn.models`: list the zoo."""

from distnn.models import names

for name in names():
    print(name)
print("tv:<name>  (any torchvision classifier, e.g. tv:efficientnet_b0)")
