"""configs.py: config files as code, `path[:arg]`, typed dotted overrides."""
import os
import textwrap

import ml_collections
import pytest

from vtadl_jax.configs import apply_overrides, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = textwrap.dedent('''
    import ml_collections

    def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.arg = arg
        c.seed = 0
        c.lr = 0.5
        c.flag = False
        c.name = "base"
        c.stages = ("block3", "block5")
        c.root = None
        c.data = ml_collections.ConfigDict(dict(size=224, scale="zero_one", max_examples=None))
        return c
''')


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "my_config.py"
    path.write_text(CONFIG)
    return str(path)


def test_load_config_with_and_without_arg(config_file):
    assert load_config(config_file).arg is None
    config = load_config(config_file + ":carpet")
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.arg == "carpet"
    assert config.data.size == 224 and config.stages == ("block3", "block5")
    assert load_config(config_file + ":a:b").arg == "a:b"  # only the first ":" splits


def test_load_config_repository_experiment():
    config = load_config(os.path.join(REPO, "experiments", "configs", "patch_gaussian_synthetic.py:texture"),
                         ["data.image_size=64", "backbone.weights=random"])
    assert config.data.root == os.path.join("outputs", "synthetic", "texture")
    assert config.data.image_size == 64 and config.backbone.weights == "random"
    assert load_config(os.path.join(REPO, "experiments", "configs", "patch_gaussian_mnist.py:7")
                       ).data.name == "mnist_one_class/7"


def test_overrides_keep_field_types(config_file):
    config = load_config(config_file, [
        "seed=3", "lr=1e-3", "flag=true", "name=hello world", "stages=('a', 'b', 'c')",
        "root=/tmp/some/dir", "data.size=64", "data.max_examples=100", "data.scale=imagenet"])
    assert config.seed == 3 and type(config.seed) is int
    assert config.lr == 0.001 and type(config.lr) is float
    assert config.flag is True
    assert config.name == "hello world"
    assert config.stages == ("a", "b", "c")
    assert config.root == "/tmp/some/dir"
    assert config.data.size == 64 and config.data.max_examples == 100
    assert type(config.data.max_examples) is int
    assert config.data.scale == "imagenet"


@pytest.mark.parametrize("override, field, value", [
    ("lr=2", "lr", 2.0),  # an int literal for a float field becomes a float
    ("stages=['x']", "stages", ("x",)),  # a list for a tuple field becomes a tuple
    ("stages=()", "stages", ()),
    ("flag=1", "flag", True), ("flag=False", "flag", False), ("flag=no", "flag", False),
    ("flag=YES", "flag", True),
    ("name=a=b", "name", "a=b"),  # only the first "=" splits
    ("name=123", "name", "123"),  # str fields take the text as is
    ("name=", "name", ""),
    ("root=None", "root", None),  # None fields take Python literals...
    ("root=(1, 2)", "root", (1, 2)),
    ("root=0.25", "root", 0.25),
    ("root=runs/x", "root", "runs/x"),  # ...or the text
    ("seed=-7", "seed", -7),
])
def test_override_values(config_file, override, field, value):
    got = load_config(config_file, [override])[field]
    assert got == value and type(got) is type(value)


def test_overrides_apply_in_order_and_load_is_fresh(config_file):
    config = load_config(config_file, ["seed=1", "seed=2"])
    assert config.seed == 2
    assert load_config(config_file).seed == 0  # a new load is not affected
    same = apply_overrides(config, ["data.size=32"])
    assert same is config and config.data.size == 32


@pytest.mark.parametrize("override, key", [
    ("sed=1", "sed"),
    ("data.sise=1", "data.sise"),
    ("dta.size=1", "dta"),
    ("seed.x=1", "seed"),  # a value is not a section
    ("name.first=1", "name"),
])
def test_missing_field_is_named(config_file, override, key):
    with pytest.raises(KeyError) as info:
        load_config(config_file, [override])
    message = info.value.args[0]
    assert repr(override) in message and repr(key) in message


@pytest.mark.parametrize("override", [
    "seed=abc", "seed=1.5", "seed=True", "lr=fast", "lr=False", "flag=maybe", "flag=2",
    "stages=3", "data.size=[1]", "seed=", "data=1",
])
def test_bad_type_is_an_error_naming_the_override(config_file, override):
    with pytest.raises(ValueError) as info:
        load_config(config_file, [override])
    assert repr(override) in str(info.value)


def test_override_without_equals(config_file):
    with pytest.raises(ValueError, match="dotted.key=value"):
        load_config(config_file, ["seed"])


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.py")
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config(path + ":x")


def test_file_without_get_config(tmp_path):
    path = tmp_path / "empty_config.py"
    path.write_text("def make_config():\n    return None\n")
    with pytest.raises(ValueError, match="get_config"):
        load_config(str(path))


def test_file_that_is_not_python(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("seed: 1\n")
    with pytest.raises(ValueError, match="config.yaml"):
        load_config(str(path))


def test_recommended_patch_gaussian_config(monkeypatch):
    """The recommended config is the shipped MVTec one on the offline backbone with the
    sweep's values, and its knobs reach the fitted model's spec."""
    from vtadl_jax.models.backbones.registry import load_backbone
    from vtadl_jax.pipelines.patch_gaussian import spec_from_config

    monkeypatch.setenv("MVTEC_AD_ROOT", "/data/mvtec")
    monkeypatch.delenv("CONTNET_B_WEIGHTS", raising=False)
    path = os.path.join(REPO, "experiments", "configs", "patch_gaussian_recommended.py")
    config = load_config(path + ":bottle")
    shipped = load_config(os.path.join(REPO, "experiments", "configs",
                                       "patch_gaussian_mvtec.py:bottle"))
    assert config.data.name == "mvtec_ad/bottle" and config.data.root == "/data/mvtec"
    assert config.backbone.name == "efficientnet_lite0" and config.backbone.weights is None
    assert config.gaussian.eps > shipped.gaussian.eps
    assert config.gaussian.blur_sigma < shipped.gaussian.blur_sigma
    config.data.image_size = 64  # small probe; the spec takes the rest from the config
    spec = spec_from_config(config, load_backbone("efficientnet_lite0", "random"))
    assert spec.eps == config.gaussian.eps and spec.blur_sigma == config.gaussian.blur_sigma
    assert spec.stages == tuple(config.backbone.stages) and spec.input_size == 64
