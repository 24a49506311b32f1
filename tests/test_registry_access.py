"""A lab's shared registry on a real `mlflow server --app-name medmoco-auth` (MLflow's basic-auth
plus medmoco's rules), set up as the README says, tried door by door as hostile but authenticated
lab members would: trainers cannot touch released or other users' candidate files, nobody but the
admin renames or deletes the protected names, a release manager's hand-made release or edited
record is caught by `medmoco review --name`, roles are a declaration, and no password reaches any
output."""
import json
import os

import pytest
import requests

from medmoco.config import FinetuneConfig, load_config
from medmoco.registry.integrity import IntegrityError, fetch_version
from pipelines.finetune import training
from pipelines.register import register

from .conftest import finetune_settings
from .servers import MlflowServer

NAME = "lab-model"
CANDIDATES = "lab-model-candidates"
PASSWORDS = {"admin": "pw-Admin-51d0c9e2", "t1": "pw-Trainer1-7f3a9c04", "t2": "pw-Trainer2-0c4d1e88",
             "rm1": "pw-Release-2b8e6d17", "rev1": "pw-Review-9a6f2c31"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("auth-server")
    ini = work / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                   f"database_uri = sqlite:///{work / 'auth.db'}\nadmin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   # checking a password (PBKDF2) on every request made this test take minutes
                   "auth_cache_ttl_seconds = 60\n")
    srv = MlflowServer(work, app_name="medmoco-auth",
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


def _cli(monkeypatch, capsys, outputs, user, *args):
    """The `medmoco` command as ``user`` (in this process: a subprocess costs ~15 s of imports)."""
    from pipelines.cli import main

    _as(monkeypatch, user)
    code = main(list(args))
    captured = capsys.readouterr()
    outputs.append(captured.out + captured.err)
    return _Result(code, captured.out, captured.err)


def _refused(call) -> str:
    """Run ``call``; it must be refused by the server (403 / PERMISSION_DENIED). Returns the message."""
    from mlflow.exceptions import MlflowException

    try:
        call()
    except MlflowException as err:
        assert err.error_code == "PERMISSION_DENIED", err
        return str(err)
    except Exception as err:  # the artifact repository raises requests' HTTPError on a 403
        assert "403" in str(err), err
        return str(err)
    raise AssertionError("the server accepted the call")


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _artifact_path(source: str) -> str:
    """``mlflow-artifacts:/3/abc/artifacts/model`` -> ``3/abc/artifacts/model`` (the proxy's path)."""
    return source.split("mlflow-artifacts:", 1)[1].lstrip("/")


def test_a_hostile_lab_member_meets_a_refusal_at_every_door(server, cls_cache, easy_cache, tmp_path, monkeypatch,
                                                             capsys):
    from mlflow.server import get_app_client

    uri, outputs = server.uri, []
    _as(monkeypatch, "admin")
    auth = get_app_client("medmoco-auth", tracking_uri=uri)
    for user in ("t1", "t2", "rm1", "rev1"):
        auth.create_user(user, PASSWORDS[user])
    roles_args = ("registry", "roles", "--name", NAME, "--trainers", "t1,t2", "--release-managers", "rm1",
                  "--reviewers", "rev1", "--margin", "0.01", "--tracking-uri", uri)
    roles = _cli(monkeypatch, capsys, outputs, "admin", *roles_args)
    assert roles.returncode == 0, roles.stderr[-2000:]
    assert [line.split()[0] for line in roles.stdout.splitlines()[2:6]] == ["rev1", "rm1", "t1", "t2"]
    again = _cli(monkeypatch, capsys, outputs, "admin", *roles_args)  # a declaration: the same again is a no-op
    assert again.returncode == 0 and again.stdout == roles.stdout, again.stderr[-2000:]

    # t1 trains; t1 and t2 each register a candidate of that run (the same weights: equal models)
    _as(monkeypatch, "t1")
    data = finetune_settings(cls_cache, str(tmp_path / "run"), "unused", mode="scratch", epochs=1)
    data["tracking"] = {"uri": uri, "experiment": "medmoco-finetune"}
    run = training(0, load_config(FinetuneConfig, None, data))
    first = register(run["run_id"], NAME, "candidate", uri)["version"]
    _as(monkeypatch, "t2")
    second = register(run["run_id"], NAME, "", uri)["version"]
    client = _client(uri)
    cand1 = client.get_model_version(CANDIDATES, str(first))
    cand1_model_id = cand1.source.split("models:/", 1)[1]  # the logged model the version was made from
    assert json.loads(cand1.tags["medmoco.files_sha256"])  # pinned at registration

    # promoting needs the release-manager role, said before any work is done
    for user in ("rev1", "t1"):
        refused = _cli(monkeypatch, capsys, outputs, user, "review", "--name", NAME, "--promote", str(first),
                       "--cache", cls_cache, "--tracking-uri", uri)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert refused.stderr.strip().splitlines()[-1] == (
            f"medmoco review: error: user {user} may not promote to {NAME}: promoting needs the release-manager "
            "role (an admin grants it with `medmoco registry roles --release-managers USER`)")
        assert "already exists" not in refused.stdout + refused.stderr
    _as(monkeypatch, "admin")
    assert not client.search_runs([client.get_experiment_by_name("medmoco-releases").experiment_id])

    # rm1 releases candidate 1, then candidate 2 after a comparison on the cache
    _cli(monkeypatch, capsys, outputs, "rm1", "review", "--name", NAME, "--promote", str(first), "--tracking-uri", uri)
    # compared on the easy cache (5 test patients; the same 32 px windows): equal models, non-inferior
    done = _cli(monkeypatch, capsys, outputs, "rm1", "review", "--name", NAME, "--promote", str(second), "--cache",
                easy_cache, "--cases", "0", "--replicates", "200", "--min-patients", "2", "--out", str(tmp_path / "p2"),
                "--tracking-uri", uri)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "history verified (2 releases" in done.stdout
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.tags["source_candidate_version"] == str(second) and champion.tags["margin"] == "0.01"
    released_model = _artifact_path(champion.source) + "/artifacts/model.pt"
    candidate_model = _artifact_path(client.get_logged_model(cand1_model_id).artifact_location) + "/artifacts/model.pt"
    release_run = champion.tags["medmoco.release_run"]
    before = {p: fetch_version(f"models:/{n}/{v}", uri).digests for p, n, v in
              (("released", NAME, champion.version), ("candidate", CANDIDATES, first))}

    # 1. files: t2 writes neither the released files nor t1's candidate (nor t1 its own, once registered)
    for user, path in (("t2", released_model), ("t2", candidate_model), ("t1", candidate_model),
                       ("rm1", released_model)):
        put = requests.put(f"{uri}/api/2.0/mlflow-artifacts/artifacts/{path}", data=b"not the model",
                           auth=(user, PASSWORDS[user]), timeout=30)
        assert put.status_code == 403, (user, path, put.status_code, put.text[:300])
        delete = requests.delete(f"{uri}/api/2.0/mlflow-artifacts/artifacts/{path}",
                                 auth=(user, PASSWORDS[user]), timeout=30)
        assert delete.status_code == 403, (user, path, delete.status_code)
    evil = tmp_path / "pyfunc_model.py"
    evil.write_text("raise SystemExit('trainer code ran')\n")
    _as(monkeypatch, "t2")
    _refused(lambda: client.log_artifact(release_run, str(evil), "model/code"))
    _refused(lambda: client.log_model_artifact(cand1_model_id, str(evil)))
    _as(monkeypatch, "rm1")  # a finished release run is sealed for release managers too
    _refused(lambda: client.log_artifact(release_run, str(evil), "comparison"))
    _refused(lambda: client.set_tag(release_run, "medmoco.decision", "released"))
    after = {p: fetch_version(f"models:/{n}/{v}", uri).digests for p, n, v in
             (("released", NAME, champion.version), ("candidate", CANDIDATES, first))}
    assert after == before

    # 2. names: neither a trainer nor a release manager renames or deletes a protected name
    experiments = {e: client.get_experiment_by_name(e).experiment_id
                   for e in ("medmoco-releases", "medmoco-review", "medmoco-policy")}
    for user in ("t2", "rm1"):
        _as(monkeypatch, user)
        for model in (NAME, CANDIDATES):
            assert "admins only" in _refused(lambda: client.rename_registered_model(model, model + "-old"))
            _refused(lambda: client.delete_registered_model(model))
        _refused(lambda: client.delete_model_version(NAME, champion.version))
        for experiment_id in experiments.values():
            _refused(lambda: client.rename_experiment(experiment_id, "taken-over"))
            _refused(lambda: client.delete_experiment(experiment_id))
    _as(monkeypatch, "admin")
    assert client.get_registered_model(NAME).name == NAME
    assert {e: client.get_experiment(i).name for e, i in experiments.items()} == \
        {e: e for e in experiments}

    # the champion loads (no pickle), its own check included, and the history verifies
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    _as(monkeypatch, "rev1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert mlflow.pyfunc.load_model(f"models:/{NAME}@champion") is not None
    listing = _cli(monkeypatch, capsys, outputs, "rev1", "review", "--name", NAME, "--tracking-uri", uri)
    assert listing.returncode == 0 and "history verified" in listing.stdout

    # 3. a release manager's release by plain API, with promotion tags written by hand: caught
    _as(monkeypatch, "rm1")
    sneaky = client.copy_model_version(f"models:/{CANDIDATES}/{first}", NAME)
    for key, value in {"promoted_by": "rm1", "comparison_run": release_run, "decision": "non-inferior"}.items():
        client.set_model_version_tag(NAME, sneaky.version, key, value)
    client.set_registered_model_alias(NAME, "champion", sneaky.version)
    caught = _cli(monkeypatch, capsys, outputs, "rev1", "review", "--name", NAME, "--tracking-uri", uri)
    assert caught.returncode == 1
    assert f"history NOT verified: {NAME}@champion is v{sneaky.version}, but the last promotion record gives it to " \
           f"v{champion.version}" in caught.stdout
    assert f"{NAME} v{sneaky.version}: released outside medmoco, no promotion record (its promotion tags were " \
           "written by hand)" in caught.stdout
    _as(monkeypatch, "rm1")
    client.set_registered_model_alias(NAME, "champion", champion.version)
    _as(monkeypatch, "admin")
    client.delete_model_version(NAME, sneaky.version)
    assert _cli(monkeypatch, capsys, outputs, "rev1", "review", "--name", NAME, "--tracking-uri", uri).returncode == 0
    _as(monkeypatch, "rm1")  # an edited record digest on the released version: caught, naming the record
    client.set_model_version_tag(NAME, champion.version, "medmoco.record_sha256", "0" * 64)
    caught = _cli(monkeypatch, capsys, outputs, "rev1", "review", "--name", NAME, "--tracking-uri", uri)
    assert caught.returncode == 1 and f"history NOT verified: record 2 ({NAME} v{champion.version}, release run " \
        f"{release_run}): the version's tags" in caught.stdout

    # 4. files changed behind MLflow's back (the storage itself): every loader refuses, naming the file
    stored = os.path.join(server.workdir, "server-artifacts", released_model)
    with open(stored, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(IntegrityError, match="file artifacts/model.pt has sha256"):
        fetch_version(f"models:/{NAME}@champion", uri)
    cli = _cli(monkeypatch, capsys, outputs, "rev1", "evaluate", "--model", f"models:/{NAME}@champion", "--cache",
               cls_cache, "--out", str(tmp_path / "eval"), "--tracking-uri", uri)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert "artifacts/model.pt has sha256" in cli.stderr.strip().splitlines()[-1]

    # 5. roles are a declaration: t2 becomes a reviewer (no more registering), rev1 is removed
    moved = _cli(monkeypatch, capsys, outputs, "admin", "registry", "roles", "--name", NAME, "--reviewers", "t2",
                 "--remove", "rev1", "--tracking-uri", uri)
    assert moved.returncode == 0, moved.stderr[-2000:]
    table = {line.split()[0]: line for line in moved.stdout.splitlines()[2:] if line.strip()}
    assert "reviewer" in table["t2"] and "rev1" not in table and "trainer" in table["t1"]
    _as(monkeypatch, "t2")
    _refused(lambda: client.set_registered_model_alias(CANDIDATES, "candidate", str(first)))
    _as(monkeypatch, "rev1")
    _refused(lambda: client.get_registered_model(NAME))

    # no password in any output or file this test made (the server's own user store aside)
    leaks = [text[:80] for text in outputs if any(p in text for p in PASSWORDS.values())]
    secrets = [p.encode() for p in PASSWORDS.values()]
    for root in (tmp_path, server.workdir):
        for dirpath, _, files in os.walk(root):
            for file in files:
                if file == "auth.db" or file.endswith(".ini"):
                    continue  # the server's own user store and config (hashes; the admin bootstrap)
                data = open(os.path.join(dirpath, file), "rb").read()
                leaks += [os.path.join(dirpath, file) for s in secrets if s in data]
    assert not leaks, leaks[:5]
