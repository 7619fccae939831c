"""Where the config is read from: the checkout's conf/, else the copy installed with the package."""
import pytest

from conftest import CONF_DIR, ROOT
from tulip.config_files import config_dir


def make_conf(folder):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("epochs: 1\n")
    return folder


def test_a_checkout_reads_its_own_conf():
    assert config_dir() == CONF_DIR


def test_without_a_checkout_the_packaged_copy_is_read(tmp_path):
    packaged = make_conf(tmp_path / "site-packages" / "tulip" / "conf")
    assert config_dir(checkout=tmp_path / "no-checkout", packaged=packaged) == packaged


def test_a_stray_conf_without_run_py_is_not_a_checkout(tmp_path):
    """site-packages/conf (another distribution's) beside an installed tulip/ is not Tulip's config."""
    make_conf(tmp_path / "site-packages" / "conf")
    packaged = make_conf(tmp_path / "site-packages" / "tulip" / "conf")
    assert config_dir(checkout=tmp_path / "site-packages", packaged=packaged) == packaged


def test_the_checkout_wins_over_a_packaged_copy(tmp_path):
    packaged = make_conf(tmp_path / "tulip" / "conf")
    assert config_dir(checkout=ROOT, packaged=packaged) == CONF_DIR


def test_no_config_anywhere_names_both_places(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-checkout.*conf.*nowhere"):
        config_dir(checkout=tmp_path / "no-checkout", packaged=tmp_path / "nowhere")
