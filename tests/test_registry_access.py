"""A lab's shared registry on a real `mlflow server --app-name basic-auth`: roles set with
`medmoco registry roles`, trainers register candidates and cannot release, release managers can,
every release is audited, and no password reaches any output."""
import os

import pytest

from medmoco.config import FinetuneConfig, load_config
from pipelines.finetune import training
from pipelines.register import register
from pipelines.review import promote, release_history

from .conftest import finetune_settings
from .servers import MlflowServer

NAME = "lab-model"
PASSWORDS = {"admin": "pw-Admin-51d0c9e2", "trainer1": "pw-Trainer-7f3a9c04", "rm1": "pw-Release-2b8e6d17"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("auth-server")
    ini = work / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                   f"database_uri = sqlite:///{work / 'auth.db'}\nadmin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   # checking a password (PBKDF2) on every request made this test take minutes
                   "auth_cache_ttl_seconds = 60\n")
    srv = MlflowServer(work, app_name="basic-auth",
                       env={"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORDS["admin"],
                            "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()})  # CSRF protection
    srv.start()
    yield srv
    srv.stop()


def _as(monkeypatch, user):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS[user])


class _Result:
    def __init__(self, returncode, out, err):
        self.returncode, self.stdout, self.stderr = returncode, out, err


def _cli(monkeypatch, capsys, user, *args):
    """The `medmoco` command as ``user`` (in this process: a subprocess costs ~15 s of imports)."""
    from pipelines.cli import main

    _as(monkeypatch, user)
    code = main(list(args))
    captured = capsys.readouterr()
    return _Result(code, captured.out, captured.err)


def test_trainers_register_release_managers_release_and_passwords_stay_secret(server, cls_cache, tmp_path,
                                                                              monkeypatch, capsys):
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    uri = server.uri
    _as(monkeypatch, "admin")
    auth = get_app_client("basic-auth", tracking_uri=uri)
    for user in ("trainer1", "rm1"):
        auth.create_user(user, PASSWORDS[user])
    outputs = []
    roles = _cli(monkeypatch, capsys, "admin", "registry", "roles", "--name", NAME, "--trainers", "trainer1",
                 "--release-managers", "rm1", "--tracking-uri", uri)
    outputs.append(roles.stdout + roles.stderr)
    assert roles.returncode == 0, roles.stderr[-2000:]
    assert "trainer1  EDIT  registered model lab-model-candidates" in roles.stdout
    assert "rm1       EDIT  registered model lab-model" in roles.stdout

    _as(monkeypatch, "trainer1")  # trains and registers a candidate
    data = finetune_settings(cls_cache, str(tmp_path / "run"), "unused", mode="scratch", epochs=1)
    data["tracking"] = {"uri": uri, "experiment": "medmoco-finetune"}
    run = training(0, load_config(FinetuneConfig, None, data))
    candidate = register(run["run_id"], NAME, "candidate", uri)["version"]
    assert candidate == 1
    refused = _cli(monkeypatch, capsys, "trainer1", "review", "--name", NAME, "--promote", str(candidate),
                   "--tracking-uri", uri)
    outputs.append(refused.stdout + refused.stderr)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        "medmoco review: error: user trainer1 may not write registered model lab-model (needs EDIT; ask a release "
        "manager)")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with pytest.raises(MlflowException) as err:  # nor around medmoco: the server refuses the copy itself
        client.create_model_version(NAME, f"models:/{NAME}-candidates/1")
    assert err.value.error_code == "PERMISSION_DENIED"

    _as(monkeypatch, "rm1")  # releases it
    result = promote(NAME, str(candidate), "champion", tracking_uri=uri, cases=0)
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == str(result["released_version"])
    assert champion.tags["promoted_by"] == "rm1" and champion.tags["source_candidate_version"] == "1"
    assert champion.tags["promoted_at"] and champion.tags["comparison_run"].startswith("none")
    rows, warnings = release_history(NAME, uri)
    assert rows[0]["promoted by"] == "rm1" and not warnings
    listing = _cli(monkeypatch, capsys, "rm1", "review", "--name", NAME, "--tracking-uri", uri)
    outputs.append(listing.stdout + listing.stderr)
    assert listing.returncode == 0 and "rm1" in listing.stdout

    _as(monkeypatch, "trainer1")  # may read the released model, not move its alias
    with pytest.raises(MlflowException) as err:
        client.set_registered_model_alias(NAME, "champion", champion.version)
    assert err.value.error_code == "PERMISSION_DENIED"
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert mlflow.pyfunc.load_model(f"models:/{NAME}@champion") is not None

    secrets = [p.encode() for p in PASSWORDS.values()]
    leaks = [text for text in outputs if any(s.decode() in text for s in secrets)]
    for root in (tmp_path, server.workdir):
        for dirpath, _, files in os.walk(root):
            for file in files:
                if file == "auth.db" or file.endswith(".ini"):
                    continue  # the server's own user store and config (hashes; the admin bootstrap)
                data = open(os.path.join(dirpath, file), "rb").read()
                leaks += [os.path.join(dirpath, file) for s in secrets if s in data]
    assert not leaks, leaks[:5]  # runs, checkpoints, spool, artifacts, registered model, console
