"""The container image (issue 27): deploy/image/build makes it from
Debian's packages (no base image is pulled; the root file system is
cached outside the checkout) and this checkout's binary. Run with buildah
(chroot isolation, the host's network), the image's `strata engine` runs
as nobody, loads the model from a mounted volume, answers a completion to
its replica token and no one else."""
import json
import os
import shutil
import subprocess
import tempfile

import httpx

from conftest import MODEL_ID, STRATA, free_port, wait_healthy

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
BUILDAH = ["buildah", "--storage-driver", "vfs"]
TAG = "localhost/strata:e2e"


def buildah(*args, timeout=600):
    r = subprocess.run([*BUILDAH, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"buildah {' '.join(args)}: {r.stderr}"
    return r.stdout.strip()


def test_the_image_runs_the_engine_as_nobody_and_answers():
    built = subprocess.run([os.path.join(ROOT, "deploy", "image", "build"), STRATA, TAG],
                           capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip() == TAG
    out = subprocess.run([STRATA, "model", "fetch", "--model", MODEL_ID, "--json"], capture_output=True,
                         text=True, timeout=600, check=True).stdout
    # A volume nobody may read, as a Pod's model volume is.
    models = tempfile.mkdtemp(prefix="strata-image-")
    os.chmod(models, 0o755)
    shutil.copy(json.loads(out.splitlines()[-1])["path"], os.path.join(models, "model.gguf"))
    os.chmod(os.path.join(models, "model.gguf"), 0o644)
    container = buildah("from", TAG)
    port = free_port()
    engine = None
    try:
        assert buildah("run", "--isolation", "chroot", container, "--", "id", "-u") == "65534"
        engine = subprocess.Popen(
            [*BUILDAH, "run", "--isolation", "chroot", "--env", "STRATA_REPLICA_TOKEN=image-test",
             "--volume", f"{models}:/models:ro", container, "--",
             "/usr/local/bin/strata", "engine", "--model", "/models/model.gguf", "--model-name", MODEL_ID,
             "--port", str(port),
             "--threads", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(engine, base, "the image's engine", timeout=120)
        body = {"model": MODEL_ID, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60,
                       headers={"Authorization": "Bearer image-test"})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].strip()
        refused = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert refused.status_code == 401, refused.text
    finally:
        if engine is not None:
            engine.terminate()
            try:
                engine.wait(timeout=30)
            except subprocess.TimeoutExpired:
                engine.kill()
        subprocess.run([*BUILDAH, "rm", container], capture_output=True, timeout=120)
        subprocess.run([*BUILDAH, "rmi", "--force", TAG], capture_output=True, timeout=120)
        shutil.rmtree(models, ignore_errors=True)
