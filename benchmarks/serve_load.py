"""`medtransfer serve` under load and under attack: starts the real CLI and hammers it.

    python benchmarks/serve_load.py [--data DIR_OF_IMAGES] [--run RUN] [--requests 200] [--max-concurrent 2]

Prints ONE JSON line on stdout (logs go to stderr):

- non_2xx_valid: valid requests (``--requests``, half with heatmaps, all at once from as
  many threads) whose final answer is not 2xx; a client honours 503's Retry-After (the
  retries are counted in ``busy_retries``);
- differs_from_serial: valid answers whose class, probabilities (1e-6) or heatmap (1e-5)
  differ from the answer to the same image asked alone before the load;
- hostile: the status each hostile request got, sent during the load: a 13000 x 13000
  16-bit PNG bomb, a truncated JPEG, junk bytes, a 60 MB body (with Content-Length) and
  one streamed without it, a JSON body instead of a form, and a slow client that sends
  its image over 4 s;
- bomb_refused_seconds and bomb_rss_growth_mb: the bomb alone, before the load;
- peak_rss_mb: the server's VmHWM at the end; alive: /health answers 200 at the end.

Without ``--run`` a resnet18 with random weights (224 px, decode size 256) is saved to a
temporary folder; without ``--data`` 16 noise PNGs of 300-900 px are generated.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

TARGETS = {"non_2xx_valid": 0, "differs_from_serial": 0, "bomb_refused_seconds": 1.0, "bomb_rss_growth_mb": 200,
           "peak_rss_mb": 2048}


def png_bomb(side: int = 13000) -> bytes:
    """A real side x side 16-bit grayscale PNG of zeros: a few hundred KB that decode to side^2 x 2 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    packer, row = zlib.compressobj(9), b"\0" * (1 + 2 * side)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([16, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def images(data: Path | None, count: int, folder: Path) -> list[tuple[str, bytes]]:
    if data is not None:
        files = sorted(p for p in data.rglob("*") if p.suffix.lower() in {".jpeg", ".jpg", ".png"})[:count]
        return [(p.name, p.read_bytes()) for p in files]
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        path = folder / f"noise{i}.png"
        Image.fromarray(rng.integers(0, 256, (300 + 37 * i, 400 + 29 * i), dtype=np.uint8)).save(path)
        out.append((path.name, path.read_bytes()))
    return out


def saved_run(run: str | None, folder: Path) -> Path:
    if run:
        return Path(run)
    import torch

    from medtransfer.artifacts import model_info, save_model
    from medtransfer.models.backbones import create_backbone
    from medtransfer.models.strategies import TransferModel

    torch.manual_seed(0)
    net, spec = create_backbone("resnet18", num_classes=2, weights="none")
    model = TransferModel(net, spec)
    info = model_info(model, classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", threshold=0.5,
                      image_size=224, decode_size=256)
    save_model(model, info, folder / "run")
    return folder / "run"


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ask(url: str, name: str, payload: bytes, cam: bool, retries: list[int]) -> httpx.Response:
    """A well-behaved client: on 503 it waits Retry-After seconds and asks again."""
    for _ in range(100):
        response = httpx.post(f"{url}/predict?cam_values={str(cam).lower()}", files={"file": (name, payload)}, timeout=300)
        if response.status_code != 503:
            return response
        retries.append(1)
        time.sleep(float(response.headers.get("retry-after", "1")))
    return response


def same(got: dict, want: dict) -> bool:
    if got["predicted"] != want["predicted"]:
        return False
    if any(abs(got["probabilities"][c] - p) > 1e-6 for c, p in want["probabilities"].items()):
        return False
    if "gradcam_map" in want:
        maps = [np.frombuffer(base64.b64decode(a["gradcam_map"]["float32_base64"]), "<f4") for a in (got, want)]
        return bool(np.allclose(maps[0], maps[1], atol=1e-5, rtol=0))
    return True


RETRY_SECONDS = 2


def hostile(url: str, sample: bytes, bomb: bytes) -> dict[str, int | str]:
    """Each hostile request's status (or the transport error's name when the server hung up)."""
    form = {"content-type": "multipart/form-data; boundary=x"}
    head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="f.png"\r\n\r\n'

    def streamed(total: int):
        yield head
        for _ in range(total // 2**16):
            yield b"\0" * 2**16

    def slow():
        yield head
        for i in range(0, len(sample), max(1, len(sample) // 8)):
            time.sleep(0.5)
            yield sample[i : i + max(1, len(sample) // 8)]
        yield b"\r\n--x--\r\n"

    cases = {
        "bomb_png_13000x13000x16bit": lambda: {"files": {"file": ("bomb.png", bomb)}},
        "truncated": lambda: {"files": {"file": ("cut.jpeg", sample[: len(sample) // 3])}},
        "junk": lambda: {"files": {"file": ("junk.png", os.urandom(50_000))}},
        "body_60mb": lambda: {"files": {"file": ("big.png", b"\0" * (60 * 2**20))}},
        "body_60mb_streamed": lambda: {"content": streamed(60 * 2**20), "headers": form},
        "wrong_content_type": lambda: {"json": {"file": base64.b64encode(sample).decode()}},
        "slow_client": lambda: {"content": slow(), "headers": form},
    }
    out: dict[str, int | str] = {}
    for name, request in cases.items():
        for _ in range(100):  # hostile clients also come back after a 503, to get a real verdict
            try:
                status = httpx.post(f"{url}/predict", **request(), timeout=300).status_code
            except httpx.TransportError as exc:
                status = type(exc).__name__
            if status != 503:
                break
            time.sleep(RETRY_SECONDS)
        out[name] = status
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--run")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--max-concurrent", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run, pictures, bomb = saved_run(args.run, folder), images(args.data, args.images, folder), png_bomb()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        log = open(folder / "serve.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "medtransfer.cli", "serve", "--run", str(run), "--port",
                                   str(port), "--max-concurrent", str(args.max_concurrent)], stdout=log, stderr=log)
        try:
            result = measure(url, server.pid, pictures, bomb, args.requests)
            result["alive"] = server.poll() is None and httpx.get(f"{url}/health").status_code == 200
        finally:
            server.terminate()
            server.wait(30)
        result["bomb_bytes"] = len(bomb)
        result["targets_met"] = (result["alive"] and result["non_2xx_valid"] == 0 and result["differs_from_serial"] == 0
                                 and result["bomb_refused_seconds"] < 1 and result["bomb_rss_growth_mb"] < 200
                                 and result["peak_rss_mb"] < 2048)
        print(json.dumps(result))


def measure(url: str, pid: int, pictures: list[tuple[str, bytes]], bomb: bytes, requests: int) -> dict:
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    retries: list[int] = []
    serial = {(k, cam): ask(url, *pictures[k], cam, retries).json() for k in range(len(pictures)) for cam in (False, True)}
    before = rss_mb(pid)
    start = time.perf_counter()
    bomb_status = httpx.post(f"{url}/predict", files={"file": ("bomb.png", bomb)}).status_code
    bomb_seconds = time.perf_counter() - start
    bomb_growth = rss_mb(pid) - before
    jobs = [(i % len(pictures), i % 2 == 1) for i in range(requests)]
    attack: dict = {}
    attacker = threading.Thread(target=lambda: attack.update(hostile(url, pictures[0][1], bomb)))
    start = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        attacker.start()
        answers = list(pool.map(lambda job: ask(url, *pictures[job[0]], job[1], retries), jobs))
        attacker.join()
    seconds = time.perf_counter() - start
    ok = [a.status_code // 100 == 2 for a in answers]
    return {
        "requests": requests,
        "non_2xx_valid": ok.count(False),
        "differs_from_serial": sum(1 for job, a, good in zip(jobs, answers, ok) if good and not same(a.json(), serial[job])),
        "busy_retries": len(retries),
        "load_seconds": round(seconds, 2),
        "bomb_status": bomb_status,
        "bomb_refused_seconds": round(bomb_seconds, 3),
        "bomb_rss_growth_mb": round(bomb_growth, 1),
        "hostile": attack,
        "peak_rss_mb": round(rss_mb(pid, "VmHWM"), 1),
        "cores": os.cpu_count(),
    }


if __name__ == "__main__":
    main()
