import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.lib.archs import SEARCH, registry
from stages.lib.nets import build_model
from stages.lib.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def write_params(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_project_params_load_into_typed_sections() -> None:
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params.train.seed, int) and isinstance(params.preprocess.seed, int)
    assert params.train.arch == "airbench"
    assert 0 <= params.preprocess.val_fraction < 1
    assert isinstance(params.train.lr, float)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["train"].update(lrr=0.1), "train.lrr"),
    (lambda p: p.update(trian={"lr": 1}), "trian"),
    (lambda p: p["train"].pop("lr"), "missing key(s) ['train.lr']"),
    (lambda p: p["train"].pop("seed"), "missing key(s) ['train.seed']"),
    (lambda p: p.update(seed=0), "unknown key(s) ['seed']"),  # the old top-level seed
    (lambda p: p["train"].update(lr="abc"), "train.lr must be a number, found 'abc'"),
    (lambda p: p["train"].update(batch_size=2.5), "train.batch_size must be an integer, found 2.5"),
    (lambda p: p["train"].update(nesterov="yes"), "train.nesterov must be true or false"),
    (lambda p: p["train"].update(arch="vgg"), "train.arch must be one of"),
    (lambda p: p["preprocess"].update(val_fraction=1.5), "preprocess.val_fraction must be a number in [0, 1)"),
    (lambda p: p["download"].update(md5="xyz"), "download.md5 must be null, 32 lowercase hex digits"),
    (lambda p: p["download"].update(md5={"train-images-idx3-ubyte.gz": "xyz"}), "download.md5 must be null"),
    (lambda p: p["download"].update(md5={"a": 1}), "download.md5.a must be a string"),
    (lambda p: p["preprocess"].update(keep={"cat": 0}), "preprocess.keep.cat must be a share in (0, 1]"),
    (lambda p: p["train"].update(sampler="weighted"), "train.sampler must be one of"),
    (lambda p: p["download"].update(md5=[1]), "download.md5 must be a string"),
    (lambda p: p["download"].update(dataset="imagenet"), "download.dataset must be one of"),
    (lambda p: p["train"].update(arch="mnist-mlp"), "train.arch must be one of"),
    (lambda p: p["train"].update(lr=float("nan")), "train.lr must be a finite number"),
    (lambda p: p["preprocess"].update(seed=-1), "preprocess.seed must be an integer >= 0"),
    (lambda p: p["train"].update(seed=-1), "train.seed must be an integer >= 0"),
    (lambda p: p.update(train=[1, 2]), "train must be a mapping"),
    (lambda p: p["finetune"].update(freeze_epochs=5), "finetune.freeze_epochs"),
    (lambda p: p["train"].update(optimizer="lion"), "train.optimizer must be one of"),
    (lambda p: p["train"].update(muon_momentum=1.0), "train.muon_momentum must be a number in [0, 1)"),
    (lambda p: p["train"].update(progressive_from=8), "train.progressive_from must be 0 (off) or a side length >= 16"),
    (lambda p: p["train"].update(progressive_until=0), "train.progressive_until must be a share in (0, 1]"),
    (lambda p: p["train"].update(progressive_from=16, progressive_step=0),
     "train.progressive_step must be an integer >= 1 dividing progressive_from"),
    (lambda p: p["train"].update(progressive_from=18, progressive_step=4),
     "train.progressive_step must be an integer >= 1 dividing progressive_from"),
    (lambda p: p["train"].update(select_fraction=0), "train.select_fraction must be a share in (0, 1]"),
    (lambda p: p["train"].update(select_from=-1), "train.select_from must be an epoch >= 0"),
    (lambda p: p["train"].update(select_from=2, sampler="balanced"),
     "train.select_from must be 0 with sampler balanced"),
    (lambda p: p["train"].update(freeze_from=-1), "train.freeze_from must be an epoch >= 0"),
    (lambda p: p["train"].update(freeze_blocks=0), "train.freeze_blocks must be an integer >= 1"),
])
def test_bad_params_are_refused_with_the_full_key(tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(ParamsError) as err:
        load_params(write_params(tmp_path, edit))
    assert message in str(err.value)


def test_numbers_written_as_strings_by_yaml_are_accepted(tmp_path: Path) -> None:
    # PyYAML reads `1e-3` (no dot) as a string; it is still a number to a user.
    path = write_params(tmp_path, lambda p: p["train"].update(lr="1e-3"))
    assert load_params(path).train.lr == 0.001


def test_unreadable_params_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed")
    with pytest.raises(ParamsError, match="params.yaml: not valid YAML"):
        load_params(path)


def test_a_preset_keeps_the_local_copy_make_local_data_pointed_at(tmp_path: Path) -> None:
    from stages.lib.params import preset_overrides

    base, mirror = ROOT / "params.yaml", {"train-images-idx3-ubyte.gz": "0" * 32}
    local = write_params(tmp_path, lambda p: p["download"].update(
        dataset="mnist", url="file:///data/mnist/", md5=mirror))
    overrides = preset_overrides(ROOT / "presets" / "mnist_mlp.yaml", base, local)
    assert not any(o.startswith(("download.url", "download.md5")) for o in overrides)
    # a copy of another data set is not this preset's: back to the official location
    cifar = write_params(tmp_path, lambda p: p["download"].update(url="file:///data/cifar.tar.gz"))
    overrides = preset_overrides(ROOT / "presets" / "mnist_mlp.yaml", base, cifar)
    assert "download.url=null" in overrides


def test_a_preset_becomes_dvc_overrides_that_also_undo_a_previous_experiment(tmp_path: Path) -> None:
    from stages.lib.params import preset_overrides

    base = ROOT / "params.yaml"
    workspace = write_params(tmp_path, lambda p: p["train"].update(batch_size=32, arch="lenet"))
    overrides = preset_overrides(ROOT / "presets" / "mnist_airbench.yaml", base, workspace)
    # the preset's own keys (its batch_size too), and the arch a previous experiment left
    # behind, back to the base's
    assert overrides == ["download.dataset=mnist", "train.arch=airbench", "train.epochs=3.0",
                         "train.batch_size=1024", "train.optimizer=sgd", "train.lr=1.5",
                         "train.warmup=0.23",
                         "train.progressive_from=0", "train.select_from=0", "train.freeze_from=0",
                         "train.flip=false", "train.ema_every=5",
                         "train.eval_every=1", "finetune.epochs=1.0",
                         "finetune.freeze_epochs=0"]
    for preset in sorted((ROOT / "presets").glob("*.yaml")):  # every preset loads
        assert preset_overrides(preset, base, base)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ParamsError, match=r"unknown key\(s\) \['train.lrr'\]"):
        preset_overrides(bad, base, base)


# Train keys that say where and how a run happens, not what it learns: a recipe leaves them be.
RUN_KEYS = {"seed", "device", "amp", "compile", "eval_batch_size", "workers", "memory_budget", "class_weights",
            "sampler"}
# Keys read only under a setting airbench94 turns off (Muon, resizing, selection, freezing).
OFF_IN_AIRBENCH94 = {"muon_lr", "muon_momentum", "progressive_until", "progressive_step",
                     "select_fraction", "freeze_blocks"}


def test_the_airbench94_preset_pins_every_recipe_key_so_the_baseline_never_drifts() -> None:
    """The time-to-accuracy baseline must stay airbench94 whatever the default becomes: its
    preset lists every recipe key (those read only under a setting it turns off excepted)."""
    from dataclasses import fields

    import yaml

    from stages.lib.params import TrainParams

    preset = yaml.safe_load((ROOT / "presets" / "airbench94.yaml").read_text())
    assert set(preset) == {"train"}
    assert set(preset["train"]) == {f.name for f in fields(TrainParams)} - RUN_KEYS - OFF_IN_AIRBENCH94
    assert preset["train"]["optimizer"] == "sgd" and preset["train"]["progressive_from"] == 0


def test_the_muon_cut_preset_pins_every_key_it_reads_so_the_old_default_never_drifts() -> None:
    """presets/muon_cut.yaml is the default before #13's twelfth session: it lists every train
    key but those saying where and how a run happens, the Muon and cut knobs included."""
    from dataclasses import fields

    import yaml

    from stages.lib.params import TrainParams

    preset = yaml.safe_load((ROOT / "presets" / "muon_cut.yaml").read_text())["train"]
    assert set(preset) == {f.name for f in fields(TrainParams)} - RUN_KEYS
    assert preset["optimizer"] == "muon" and preset["select_from"] and preset["freeze_from"]


def test_an_unknown_key_gets_the_closest_known_one(tmp_path) -> None:
    path = tmp_path / "params.yaml"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["lrr"] = raw["train"].pop("lr")
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"unknown key\(s\) \['train.lrr'\] .*did you mean train.lr\?"):
        load_params(path)


TINY = """from stages.lib.archs import architecture
from stages.lib.nets import QuickstartMLP


@architecture("tiny", {args})
class TinyNet(QuickstartMLP):
    pass
"""


def test_an_architecture_marked_in_a_new_module_is_accepted_and_built(tmp_path, monkeypatch) -> None:
    """Adding an architecture: one marked class in one file, read by params without importing it."""
    (tmp_path / "tiny_net_for_test.py").write_text(
        TINY.format(args='any_size=True, blocks=("linear_relu_stack.0.", "linear_relu_stack.2.")'))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(SEARCH, tmp_path, "")
    path = write_params(tmp_path, lambda p: p["train"].update(arch="tiny"))
    assert load_params(path).train.arch == "tiny"  # and its recipe cuts too: it declares it takes them
    assert "tiny_net_for_test" not in sys.modules  # params read the mark, not the module
    assert type(build_model("tiny", 10, (1, 28, 28))).__name__ == "TinyNet"
    monkeypatch.delitem(SEARCH, tmp_path)
    with pytest.raises(ParamsError, match=r"train.arch must be one of \['airbench', 'lenet'"):
        load_params(path)


@pytest.mark.parametrize(("args", "problem"), [
    ("blocks=BLOCKS", r"tiny_net_for_test.py:5: @architecture takes a name and any_size, blocks, all literals"),
    ("", r"architecture 'tiny' is registered twice \(tiny_net_for_test:TinyNet and "
         r"tiny_net_for_test2:TinyNet\); rename one"),
])
def test_a_mark_params_cannot_read_is_refused_naming_its_file(tmp_path, monkeypatch, args, problem) -> None:
    (tmp_path / "tiny_net_for_test.py").write_text(TINY.format(args=args))
    if not args:
        (tmp_path / "tiny_net_for_test2.py").write_text(TINY.format(args=args))
    monkeypatch.setitem(SEARCH, tmp_path, "")
    with pytest.raises(ValueError, match=problem):
        registry()


def test_an_arch_switch_lists_every_knob_that_does_not_suit_it_and_its_preset(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # where presets/ is
    path = write_params(tmp_path, lambda p: p["train"].update(arch="mnist_mlp"))
    with pytest.raises(ParamsError) as refused:
        load_params(path)
    message = str(refused.value)
    assert message.startswith("params: train.arch mnist_mlp does not suit train.progressive_from 16: "
                              "set it to 0 (mnist_mlp takes only the size it was built for); "
                              "train.freeze_from 10: set it to 0 (mnist_mlp has no blocks to freeze)")
    assert message.endswith("; presets/mnist_mlp.yaml sets them: `make tutorial-mnist_mlp`")
    path = write_params(tmp_path, lambda p: p["train"].update(arch="lenet", progressive_from=0, freeze_blocks=5))
    with pytest.raises(ParamsError, match=r"train.freeze_blocks to at most 4 \(lenet has 4 blocks "
                                          r"\(conv1., conv2., fc1., fc2.\) to freeze\)"):
        load_params(path)
    path = write_params(tmp_path, lambda p: p["train"].update(arch="lenet", progressive_from=0))
    assert load_params(path).train.freeze_blocks == 2


@pytest.mark.parametrize("dataset, flip, tta", [("cifar10", True, "flip_shift"), ("mnist", False, "none"),
                                                ("fashion_mnist", True, "flip_shift")])
def test_auto_flips_and_tta_follow_whether_a_mirror_keeps_the_class(tmp_path, dataset, flip, tta) -> None:
    path = write_params(tmp_path, lambda p: p["download"].update(dataset=dataset))
    train = load_params(path).train
    assert (train.flip, train.tta) == (flip, tta)
    path = write_params(tmp_path, lambda p: (p["download"].update(dataset=dataset),
                                             p["train"].update(flip=True, tta="flip")))
    assert (load_params(path).train.flip, load_params(path).train.tta) == (True, "flip")  # as set


def test_a_stage_refuses_bad_params_before_it_imports_torch(tmp_path) -> None:
    write_params(tmp_path, lambda p: p["train"].update(lr="abc"))
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "stages.train", "a", "b", "c", "d", "e"],
                            cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": ""},
                            capture_output=True, text=True)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert errors == ["error: params: train.lr must be a number, found 'abc' (fix it in params.yaml "
                      "or in `dvc exp run -S train.lr=...`)"]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "stages.lib.params" in imported and "torch" not in imported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
