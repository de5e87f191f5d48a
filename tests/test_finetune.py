"""Fine-tuning: a digits model (10 classes) starts a new run on a 5-class subset."""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distnn import checkpoint, checkpoint_files, config, models
from distnn.data import digits
from distnn.errors import UserError
from distnn.optim import Optimizers
from distnn.train import train
from tests.conftest import FAST, one_line_error

DIGITS = ["data.source=imagefolder", "data.hflip=false", "optim.lr=0.03", "optim.nesterov=true",
          "train.batch_size=32", "sched.warmup_steps=0", "model.name=tutorial_cnn"]  # fmt: skip
HEAD = ["classifier.3.weight", "classifier.3.bias"]  # tutorial_cnn's last Linear


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(export of a 3-epoch digits run, 10 classes; ImageFolder of digits 0-4; work dir)."""
    root = tmp_path_factory.mktemp("ft")
    digits.write(root / "digits")
    for split in ("train", "val"):
        for c in "01234":
            shutil.copytree(root / "digits" / split / c, root / "five" / split / c)
    cfg = config.load(None, [*FAST, *DIGITS, f"run.dir={root}", "run.name=pre",
                             f"data.root={root / 'digits'}", "train.epochs=3"])  # fmt: skip
    train(cfg)
    return checkpoint.export(cfg.run_dir, root / "pre.safetensors"), root / "five", root


def five(pretrained, *extra: str) -> config.Config:
    _, subset, root = pretrained
    return config.load(None, [*FAST, *DIGITS, f"run.dir={root}", f"data.root={subset}",
                              "train.epochs=1", *extra])  # fmt: skip


@pytest.mark.timeout(240)
def test_fine_tuning_beats_training_from_scratch(pretrained, capsys):
    export = pretrained[0]
    tuned = train(five(pretrained, "run.name=tuned", f"model.init_from={export}"))
    log = capsys.readouterr().out
    scratch = train(five(pretrained, "run.name=scratch"))
    print(f"5-class digits, 1 epoch: val top-1 {tuned['val_top1']:.4f} fine-tuned from the "
          f"10-class export, {scratch['val_top1']:.4f} from scratch")  # fmt: skip
    assert f"weights from {export}; new (not loaded): {', '.join(HEAD)}" in log
    # Measured 1.000 vs 0.861 (2026-12-01): a margin far outside seed noise.
    assert tuned["val_top1"] > scratch["val_top1"] + 0.05


def test_every_tensor_but_the_head_starts_as_the_export(pretrained):
    export = pretrained[0]
    cfg = five(pretrained, f"model.init_from={export}")
    torch.manual_seed(cfg.train.seed)
    model, head, _ = models.prepare(cfg, 5, torch.device("cpu"))
    assert head == "classifier.3"
    saved = load_file(export)
    start = model.state_dict()
    for key, tensor in start.items():
        if key in HEAD:
            assert saved[key].shape[0] == 10 and tensor.shape[0] == 5
        else:
            assert torch.equal(tensor, saved[key]), key
    # The head is the fresh one a run from scratch with the same seed starts with.
    torch.manual_seed(cfg.train.seed)
    fresh, _, _ = models.prepare(five(pretrained), 5, torch.device("cpu"))
    for key in HEAD:
        assert torch.equal(start[key], fresh.state_dict()[key])


def test_every_weights_format_loads_the_same(pretrained, tmp_path):
    from safetensors.torch import save_file

    export, _, root = pretrained
    plain = load_file(export)
    torch.save(plain, tmp_path / "pre.pt")  # a .pt export, as earlier versions wrote
    wrapped = tmp_path / "ddp.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in plain.items()}}, wrapped)
    save_file(plain, tmp_path / "w.safetensors")
    step_file = checkpoint.Manager(config.CkptConfig(), root / "pre", False).saved()[-1]
    # timm's train checkpoints: the state_dict beside argparse options (not tensors only).
    timm_style = tmp_path / "timm.pth.tar"
    torch.save({"state_dict": plain, "args": argparse.Namespace(lr=0.1), "epoch": 3}, timm_style)
    nested = tmp_path / "nested.pt"
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in plain.items()}}, nested)
    sources = [export, tmp_path / "pre.pt", wrapped, tmp_path / "w.safetensors", root / "pre",
               step_file, timm_style, nested]  # fmt: skip
    for source in sources:
        torch.manual_seed(0)
        model, _, _ = models.prepare(five(pretrained, f"model.init_from={source}"), 5,
                                     torch.device("cpu"))  # fmt: skip
        state = model.state_dict()
        assert all(torch.equal(state[k], plain[k]) for k in plain if k not in HEAD), source


def test_weights_of_another_architecture_are_one_line(pretrained, tmp_path, capfd):
    from distnn.train import main

    export, subset, _ = pretrained
    argv = [f"run.dir={tmp_path}", *FAST, *DIGITS, f"data.root={subset}", "model.name=lenet5",
            f"model.init_from={export}"]  # fmt: skip
    line = one_line_error(main, argv, capfd)
    assert line.startswith(f"error: model.init_from='{export}'"), line
    # lenet5's first conv
    assert "'features.0.weight' has shape (32, 3, 5, 5) there, (6, 3, 5, 5) in this model" in line
    torch.save({"features.0.weight": torch.zeros(7, 3, 5, 5)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"'features.0.weight' has shape \(7, 3, 5, 5\) there, "
                                        r"\(32, 3, 5, 5\) in this model"):  # fmt: skip
        models.prepare(five(pretrained, f"model.init_from={tmp_path / 'bad.pt'}"), 5,
                       torch.device("cpu"))  # fmt: skip


def test_freeze_and_head_learning_rate(pretrained):
    export = pretrained[0]
    cfg = five(pretrained, "run.name=frozen", f"model.init_from={export}",
               "model.freeze=features", "optim.head_lr_scale=10", "train.max_steps=3")  # fmt: skip
    torch.manual_seed(0)
    model, head, notes = models.prepare(cfg, 5, torch.device("cpu"))
    assert "frozen: 6 parameter tensors under features" in notes
    groups = Optimizers(cfg.optim, 32, head)(model).param_groups
    assert [g["lr"] for g in groups] == pytest.approx([0.03, 0.03, 0.3, 0.3])
    assert sum(len(g["params"]) for g in groups[2:]) == 2  # classifier.3's weight and bias
    train(cfg)
    after = checkpoint_files.model_state(checkpoint.load_file(cfg.run_dir))
    saved = load_file(export)
    assert all(torch.equal(after[k], saved[k]) for k in after if k.startswith("features."))
    assert not torch.equal(after["classifier.1.weight"], saved["classifier.1.weight"])
    with pytest.raises(UserError, match=r"model\.freeze='backbone' matches no parameter"):
        models.prepare(five(pretrained, "model.freeze=backbone"), 5, torch.device("cpu"))
    with pytest.raises(UserError, match=r"leaves no parameter to train"):
        models.prepare(five(pretrained, "model.freeze=features,classifier"), 5, torch.device("cpu"))
    # The optimizer's groups follow the freeze: resuming with another is one line.
    with pytest.raises(UserError, match=r"trained with model\.freeze=\['features'\], this run"):
        train(config.load(cfg, ["model.freeze=classifier", "train.max_steps=4"]))


def test_resume_takes_the_run_s_checkpoint_not_init_from(pretrained, tmp_path, capsys):
    export = pretrained[0]
    copy = tmp_path / "copy.safetensors"
    shutil.copy(export, copy)
    shutil.copy(export.with_suffix(".json"), copy.with_suffix(".json"))
    cfg = five(pretrained, "run.name=resumed", f"model.init_from={copy}", "train.max_steps=4",
               "ckpt.every_steps=2")  # fmt: skip
    train(cfg)
    copy.unlink()  # a resumed run never reads it again
    longer = config.load(cfg, ["train.max_steps=6"])
    assert train(longer)["steps"] == 6
    assert "resumed at step 4" in capsys.readouterr().out
