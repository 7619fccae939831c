"""A dummy W&B API key that the W&B tests hand to W&B, and the check that no file of a run holds it."""
import base64
from pathlib import Path

# Recognisable, and in the format W&B accepts (40+ word characters), so W&B really uses it.
API_KEY = "TULIPDUMMYAPIKEY_" + "0123456789" * 4
# How W&B sends it: HTTP basic auth.
BASIC_AUTH_TOKEN = base64.b64encode(f"api:{API_KEY}".encode())


def assert_no_file_holds_the_key(run_dir: Path) -> None:
    """The key, raw or as the HTTP basic-auth token W&B sends, in no file, text or binary."""
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert any(path.suffix == ".wandb" for path in files) and any(path.suffix == ".pt" for path in files)
    leaks = [str(path) for path in files for secret in (API_KEY.encode(), BASIC_AUTH_TOKEN)
             if secret in path.read_bytes()]
    assert not leaks, f"the API key is written in {leaks}"
