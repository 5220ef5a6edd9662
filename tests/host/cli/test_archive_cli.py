"""``lunseal archive init`` and ``archive key export|import`` as real processes."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.daemon import LUNSEAL

PASS = "a long passphrase"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LUNSEAL_")}
    return {
        **base,
        "LUNSEAL_PASSPHRASE": PASS,
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "XDG_STATE_HOME": str(tmp_path / "xdg-state"),
    }


def run(env: dict[str, str], *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [LUNSEAL, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert proc.returncode == code, f"{args}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc


def test_init_repokey_warns_and_refuses_a_second_init(env: dict[str, str], tmp_path: Path) -> None:
    repo = tmp_path / "tape"
    proc = run(env, "archive", "init", str(repo), "--encryption", "repokey")
    assert f"archive {repo} created, encryption: repokey" in proc.stdout
    assert "Without the key AND the passphrase" in proc.stderr
    assert f"lunseal archive key export {repo} FILE" in proc.stderr
    config = json.loads((repo / "config").read_text())
    assert config["encryption"] == "repokey"
    assert (repo / "key").stat().st_mode & 0o777 == 0o600
    assert PASS.encode() not in (repo / "key").read_bytes()
    proc = run(env, "archive", "init", str(repo), "--encryption", "repokey", code=4)
    assert "already exists" in proc.stderr
    assert run(env, "archive", "check", str(repo)).stdout.strip() == "archive OK"


@pytest.mark.parametrize(
    ("args", "unset", "message"),
    [
        (["--encryption", "rot13"], False, "--encryption takes repokey, keyfile, none"),
        (["--encryption", "repokey"], True, "needs a passphrase"),
        (["--encryption", "none"], False, "takes no passphrase"),
        (["--encryption", "repokey", "--passphrase", PASS], False, "No such option"),
    ],
)
def test_init_bad_arguments(
    env: dict[str, str], tmp_path: Path, args: list[str], unset: bool, message: str
) -> None:
    if unset:
        del env["LUNSEAL_PASSPHRASE"]
    proc = run(env, "archive", "init", str(tmp_path / "a"), *args, code=2)
    assert message in proc.stderr
    assert not (tmp_path / "a" / "config").exists()


def test_init_none_warns_that_anyone_can_forge(env: dict[str, str], tmp_path: Path) -> None:
    del env["LUNSEAL_PASSPHRASE"]
    proc = run(env, "archive", "init", str(tmp_path / "plain"), "--encryption", "none")
    assert "can forge backups" in proc.stderr
    assert json.loads((tmp_path / "plain" / "config").read_text())["version"] == 1


def test_keyfile_mode_and_key_export_import(env: dict[str, str], tmp_path: Path) -> None:
    repo = tmp_path / "tape"
    proc = run(env, "--json", "archive", "init", str(repo), "--encryption", "keyfile")
    info = json.loads(proc.stdout)
    key = Path(info["key_file"])
    assert key.parent == tmp_path / "xdg" / "lunseal" / "keys"
    assert key.stat().st_mode & 0o777 == 0o600
    assert f"the key is in {key}" in proc.stderr
    assert not (repo / "key").exists()

    exported = tmp_path / "exported.key"
    run(env, "archive", "key", "export", str(repo), str(exported))
    assert exported.read_bytes() == key.read_bytes()
    proc = run(env, "archive", "key", "export", str(repo), str(exported), code=2)
    assert "not overwriting a key" in proc.stderr

    key.unlink()  # the key file is lost
    proc = run(env, "archive", "check", str(repo), code=7)
    assert "does not exist" in proc.stderr
    run(env, "archive", "init", str(tmp_path / "other"), "--encryption", "repokey")
    proc = run(env, "archive", "key", "import", str(repo), str(tmp_path / "other" / "key"), code=7)
    assert "another archive" in proc.stderr
    bad = {**env, "LUNSEAL_PASSPHRASE": "wrong"}
    proc = run(bad, "archive", "key", "import", str(repo), str(exported), code=7)
    assert "wrong passphrase" in proc.stderr
    run(env, "archive", "key", "import", str(repo), str(exported))
    assert key.read_bytes() == exported.read_bytes()
    assert run(env, "archive", "check", str(repo)).stdout.strip() == "archive OK"


def test_key_file_option_and_passphrase_file(env: dict[str, str], tmp_path: Path) -> None:
    repo, key = tmp_path / "tape", tmp_path / "my.key"
    del env["LUNSEAL_PASSPHRASE"]
    secret = tmp_path / "pass"
    secret.write_text(PASS + "\n")
    pf = ["--passphrase-file", str(secret)]
    run(env, "archive", "init", str(repo), "--encryption", "keyfile", "--key-file", str(key), *pf)
    assert key.is_file()
    run(env, "archive", "check", str(repo), "--key-file", str(key), *pf)
    run({**env, "LUNSEAL_KEY_FILE": str(key)}, "archive", "check", str(repo), *pf)
    proc = run(env, "archive", "check", str(repo), *pf, code=7)  # not at the default place
    assert "does not exist" in proc.stderr
    assert "--key-file" in proc.stderr
    proc = run(
        env, "archive", "key", "export", str(repo), str(tmp_path / "x"), "--key-file", str(key),
        code=7,
    )  # fmt: skip
    assert "LUNSEAL_PASSPHRASE" in proc.stderr


def test_export_of_an_unencrypted_archive(env: dict[str, str], tmp_path: Path) -> None:
    del env["LUNSEAL_PASSPHRASE"]
    plain = str(tmp_path / "plain")
    run(env, "archive", "init", plain, "--encryption", "none")
    proc = run(env, "archive", "key", "export", plain, str(tmp_path / "k"), code=2)
    assert "not encrypted" in proc.stderr


def test_downgraded_archive_is_refused_without_a_passphrase(
    env: dict[str, str], tmp_path: Path
) -> None:
    repo = tmp_path / "tape"
    run(env, "archive", "init", str(repo), "--encryption", "repokey")
    config = json.loads((repo / "config").read_text())
    (repo / "config").write_text(
        json.dumps({"format": "lunseal-archive", "version": 1, "chunk_size": config["chunk_size"]})
    )
    del env["LUNSEAL_PASSPHRASE"]
    proc = run(env, "archive", "check", str(repo), code=8)
    assert "was encrypted" in proc.stderr
    assert "forgery" in proc.stderr


def converse(env: dict[str, str], args: list[str], answers: list[str]) -> tuple[int, str]:
    """Run ``lunseal ARGS`` on a pseudo-terminal, typing each answer after its prompt
    (a line ending in ': '); (exit code, everything the terminal showed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [LUNSEAL, *args], stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
    )
    os.close(slave)
    out, pending = bytearray(), list(answers)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if pending and out.rstrip(b" ").endswith(b":"):
                os.write(master, pending.pop(0).encode() + b"\n")
                out += b"\n"  # what we typed is not echoed: mark the answer
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            out += chunk
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), out.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_passphrase_asked_on_a_terminal(env: dict[str, str], tmp_path: Path) -> None:
    del env["LUNSEAL_PASSPHRASE"]
    repo = str(tmp_path / "tape")
    init = ["archive", "init", repo, "--encryption", "repokey"]
    code, out = converse(env, init, ["typed secret", "typed secrex"])
    assert code == 2
    assert "the two passphrases differ" in out
    code, out = converse(env, init, ["typed secret", "typed secret"])
    assert code == 0, out
    assert "archive passphrase:" in out
    assert "typed secret" not in out  # never echoed
    code, out = converse(env, ["archive", "check", repo], ["typed secret"])
    assert (code, out.splitlines()[-1].strip()) == (0, "archive OK")
    code, out = converse(env, ["archive", "check", repo], ["wrong"])
    assert code == 7
    assert "wrong passphrase" in out
