"""`medtransfer serve` against hostile clients: every case bounded in count and time, one JSON line.

    python benchmarks/hostile.py --run RUN [--port P] [--requests 200]

Starts the real CLI (``medtransfer serve --run RUN``, default limits) on 127.0.0.1 and runs, one after the
other, each case with the answer it must get:

- ``slow_body``: two raw-socket clients that send a valid form head, then their image one byte a second, and one
  that sends 1 kB of it and stalls: 408 each (minimum rate after the grace period), while a valid request sent
  meanwhile is answered 200 within 15 s (slow uploads never hold a request slot);
- ``oversize_60mb`` / ``oversize_60mb_chunked``: a 60 MB body by Content-Length and chunked, from a raw socket
  that writes the whole body before it reads: the ``413`` status line, the connection closed without a reset;
- ``wrong_host``, ``dns_rebinding`` (foreign Host, same Origin), ``cross_origin`` (foreign Origin): 403;
- ``junk_bytes`` 415, ``truncated_png`` 400, ``json_instead_of_form`` 422;
- ``png_bomb`` (13000 x 13000 16-bit PNG, 329 kB): 413; ``deflated_dicom_bomb`` (deflated DICOM declaring
  512 x 512 x 16 bit whose pixel data inflates to 512 MiB, 0.5 MB on the wire; plain pydicom grows by 1 GB
  reading it) and ``deflated_dicom_bomb_padded_meta`` (the same with its transfer syntax past the first
  8 KiB): 400 or 413; each with the server's RSS growth while it runs (sampled every 10 ms), under 200 MB;
- ``cli_predict_junk`` / ``cli_predict_png_bomb``: ``medtransfer predict`` on such a file: exit 1, one line
  (blank lines are counted apart, in ``blank_lines``);
- then ``--requests`` valid requests at once (clients honour 503's Retry-After, at most 100 tries each).

Prints: ``cases`` (hostile cases tried), ``refused_correctly``, ``answers_lost`` (valid requests without a final
200, the slow-body case's included), ``crashes`` (the server gone or /health failing at the end),
``server_errors`` (5xx other than 503), ``peak_rss_mb`` (the server's VmHWM), ``busy_retries``, ``seconds``,
and per case ``results`` (expected, got, ok, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
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
import psutil
from PIL import Image

FORM = "multipart/form-data; boundary=x"
HEAD = b'--x\r\nContent-Disposition: form-data; name="file"; filename="f.png"\r\n\r\n'
RSS_GROWTH_LIMIT_MB = 200
CASE_TIMEOUT = 120.0


def _chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_bomb(side: int = 13000) -> bytes:
    """A real side x side 16-bit grayscale PNG of zeros: a few hundred kB that decode to side^2 x 2 bytes."""
    packer, row = zlib.compressobj(9), b"\0" * (1 + 2 * side)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([16, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def dicom_bombs(rows: int = 512, columns: int = 512, pixel_bytes: int = 512 << 20, pad: int = 9000) -> tuple[bytes, bytes]:
    """Two deflated DICOM files whose header declares rows x columns x 16 bit and whose pixel data inflates to
    ``pixel_bytes`` of zeros (deflated once, as a stream): a plain one, and one whose file meta is padded by
    ``pad`` bytes so that its transfer syntax lies past the first 8 KiB (a byte search there misses it)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality, ds.PatientID = SecondaryCaptureImageStorage, generate_uid(), "CR", "P1"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [packer.compress(body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))]
    block = bytes(1 << 20)
    parts += [packer.compress(block) for _ in range(pixel_bytes >> 20)]
    parts.append(packer.flush())
    deflated = b"".join(parts)

    def with_meta(padding: int) -> bytes:
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01" + bytes(padding)  # OB, any length, written first in group 0002
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        head = DicomBytesIO()
        head.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(head, meta, enforce_standard=True)
        return head.getvalue() + deflated

    return with_meta(0), with_meta(pad)


def sample_png(folder: Path, k: int = 0) -> bytes:
    rng = np.random.default_rng(k)
    path = folder / f"sample{k}.png"
    Image.fromarray(rng.integers(0, 256, (300 + 37 * k, 400 + 29 * k), dtype=np.uint8)).save(path)
    return path.read_bytes()


def raw_post(port: int, pieces, *, length: int | None, pause: float = 0.0, timeout: float = CASE_TIMEOUT,
             headers: dict[str, str] | None = None) -> tuple[str, bool]:
    """POST /predict from a client that writes before it reads (chunked when ``length`` is None), ``pause``
    seconds between pieces; stops writing early only when an answer is waiting. (status line or '', every byte
    sent without a reset)."""
    fields = {"Host": f"127.0.0.1:{port}", "Content-Type": FORM, **(headers or {})}
    fields["Content-Length" if length is not None else "Transfer-Encoding"] = str(length) if length is not None else "chunked"
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    complete, answer = False, b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(f"POST /predict HTTP/1.1\r\n{head}\r\n".encode())
            for piece in pieces:
                if pause and select.select([sock], [], [], pause)[0]:
                    break
                sock.sendall(piece if length is not None else b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                if length is None:
                    sock.sendall(b"0\r\n\r\n")
                complete = True
        except OSError:
            pass
        try:
            while b"\r\n" not in answer:
                piece = sock.recv(4096)
                if not piece:
                    break
                answer += piece
        except OSError:
            pass
    return answer.split(b"\r\n")[0].decode("latin-1"), complete


def status_of(line: str) -> int | str:
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else (line or "no status line")


class RssSampler:
    """The largest RSS of ``pid`` while the ``with`` block runs (every 10 ms), as growth over its start."""

    def __init__(self, pid: int) -> None:
        self.process, self.peak, self.start = psutil.Process(pid), 0, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self.start = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return round((self.peak - self.start) / 2**20, 1)


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process has had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def upload(url: str, name: str, payload: bytes, *, timeout: float = CASE_TIMEOUT, **kwargs) -> int:
    return httpx.post(f"{url}/predict", files={"file": (name, payload)}, timeout=timeout, **kwargs).status_code


def ask_until_answered(url: str, name: str, payload: bytes, retries: list[int]) -> int:
    """A well-behaved client: on 503 it waits Retry-After seconds and asks again (100 tries at most)."""
    status: int | str = "no answer"
    for _ in range(100):
        try:
            response = httpx.post(f"{url}/predict", files={"file": (name, payload)}, timeout=300)
        except httpx.TransportError as exc:
            return type(exc).__name__
        status = response.status_code
        if status != 503:
            return status
        retries.append(1)
        time.sleep(float(response.headers.get("retry-after", "1")))
    return status


def slow_body(url: str, port: int, sample: bytes) -> dict:
    """Two clients that send a valid form head, then their image one byte a second (40 s at most), and one that
    sends the head and 1 kB of it, then nothing; meanwhile a valid request, which must be answered in 15 s."""
    length = len(HEAD) + len(sample) + 8
    trickle = [HEAD] + [sample[i : i + 1] for i in range(40)]
    with ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(raw_post, port, trickle, length=length, pause=1.0) for _ in range(2)]
        slow.append(pool.submit(raw_post, port, [HEAD + sample[:1024]] + [b""] * 40, length=length, pause=1.0))
        time.sleep(2.0)
        try:
            valid = upload(url, "valid.png", sample, timeout=15)
        except httpx.TimeoutException:
            valid = "no answer in 15 s"
        got = [status_of(f.result()[0]) for f in slow]
    return {"got": got, "valid_meanwhile": valid, "ok": got == [408] * 3 and valid == 200}


def run_cases(url: str, port: int, pid: int, folder: Path, run: Path) -> dict[str, dict]:
    sample = sample_png(folder)
    bomb, (dicom, dicom_padded) = png_bomb(), dicom_bombs()
    junk = os.urandom(50_000)
    (folder / "junk.png").write_bytes(junk)
    (folder / "bomb.png").write_bytes(bomb)
    sixty = [HEAD] + [b"\0" * 2**20] * 60
    evil = f"evil.example:{port}"

    def oversize(length: int | None) -> dict:
        line, complete = raw_post(port, sixty, length=length)
        return {"got": status_of(line), "sent_all_without_reset": complete, "ok": status_of(line) == 413 and complete}

    def expect(status, call) -> dict:
        got = call()
        return {"got": got, "ok": got in status if isinstance(status, tuple) else got == status}

    def bomb_case(name: str, payload: bytes, status: tuple) -> dict:
        with RssSampler(pid) as rss:
            response = httpx.post(f"{url}/predict", files={"file": (name, payload)}, timeout=CASE_TIMEOUT)
        got = response.status_code
        return {"got": got, "detail": response.json().get("detail"), "bytes": len(payload),
                "rss_growth_mb": rss.growth_mb, "ok": got in status and rss.growth_mb < RSS_GROWTH_LIMIT_MB}

    def cli(path: Path) -> dict:
        done = subprocess.run([sys.executable, "-m", "medtransfer.cli", "predict", str(path), "--run", str(run),
                               "--accelerator", "cpu", "--num-workers", "0"], capture_output=True, text=True,
                              timeout=CASE_TIMEOUT, check=False)
        raw = (done.stdout + done.stderr).splitlines()
        lines = [line for line in raw if line.strip()]
        return {"got": {"exit": done.returncode, "lines": len(lines)}, "blank_lines": len(raw) - len(lines),
                "line": lines[0] if lines else "", "ok": done.returncode == 1 and len(lines) == 1}

    cases = {
        "slow_body": lambda: slow_body(url, port, sample),
        "oversize_60mb": lambda: oversize(len(HEAD) + 60 * 2**20),
        "oversize_60mb_chunked": lambda: oversize(None),
        "wrong_host": lambda: expect(403, lambda: upload(url, "s.png", sample, headers={"Host": evil})),
        "dns_rebinding": lambda: expect(403, lambda: upload(url, "s.png", sample, headers={
            "Host": evil, "Origin": f"http://{evil}"})),
        "cross_origin": lambda: expect(403, lambda: upload(url, "s.png", sample, headers={"Origin": "http://evil.example"})),
        "junk_bytes": lambda: expect(415, lambda: upload(url, "junk.png", junk)),
        "truncated_png": lambda: expect(400, lambda: upload(url, "cut.png", sample[: len(sample) // 3])),
        "json_instead_of_form": lambda: expect(422, lambda: httpx.post(f"{url}/predict", json={"file": "x"}).status_code),
        "png_bomb": lambda: bomb_case("bomb.png", bomb, (413,)),
        "deflated_dicom_bomb": lambda: bomb_case("bomb.dcm", dicom, (400, 413)),
        "deflated_dicom_bomb_padded_meta": lambda: bomb_case("padded.dcm", dicom_padded, (400, 413)),
        "cli_predict_junk": lambda: cli(folder / "junk.png"),
        "cli_predict_png_bomb": lambda: cli(folder / "bomb.png"),
    }
    results = {}
    for name, case in cases.items():
        started = time.perf_counter()
        try:
            results[name] = case()
        except Exception as exc:  # noqa: BLE001 - a case that cannot finish is a failed case, reported
            results[name] = {"got": f"{type(exc).__name__}: {exc}", "ok": False}
        results[name]["seconds"] = round(time.perf_counter() - started, 2)
    return results


def load(url: str, folder: Path, requests: int) -> dict:
    pictures = [(f"sample{k}.png", sample_png(folder, k)) for k in range(8)]
    retries: list[int] = []
    started = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        statuses = list(pool.map(lambda i: ask_until_answered(url, *pictures[i % 8], retries), range(requests)))
    return {"valid_requests": requests, "lost": sum(1 for s in statuses if s != 200), "busy_retries": len(retries),
            "seconds": round(time.perf_counter() - started, 2), "statuses": sorted({str(s) for s in statuses})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="Run (or model) folder to serve.")
    parser.add_argument("--port", type=int, help="Port on 127.0.0.1 (default: a free one).")
    parser.add_argument("--requests", type=int, default=200, help="Valid requests sent at once at the end.")
    args = parser.parse_args()
    port = args.port
    if port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        log = open(folder / "serve.log", "w")  # noqa: SIM115 - open while the server runs
        server = subprocess.Popen([sys.executable, "-m", "medtransfer.cli", "serve", "--run", str(args.run),
                                   "--port", str(port)], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"medtransfer serve did not start: {(folder / 'serve.log').read_text()[-2000:]}")
                time.sleep(0.3)
            results = run_cases(url, port, server.pid, folder, args.run)
            valid = load(url, folder, args.requests)
            try:
                alive = server.poll() is None and httpx.get(f"{url}/health", timeout=30).status_code == 200
            except httpx.TransportError:
                alive = False
            hwm = peak_rss_mb(server.pid) if server.poll() is None else float("nan")
        finally:
            server.terminate()
            server.wait(30)
            log.close()
        lines = [json.loads(x) for x in (folder / "serve.log").read_text().splitlines() if x.startswith('{"time"')]
    statuses = [x["status"] for x in lines]
    print(json.dumps({
        "cases": len(results),
        "refused_correctly": sum(1 for r in results.values() if r["ok"]),
        "answers_lost": valid["lost"] + (0 if results["slow_body"].get("valid_meanwhile") == 200 else 1),
        "crashes": 0 if alive else 1,
        "server_errors": sum(1 for s in statuses if s >= 500 and s != 503),
        "peak_rss_mb": round(hwm, 1),
        "valid_requests": valid["valid_requests"] + 1,
        "busy_retries": valid["busy_retries"],
        "load_seconds": valid["seconds"],
        "seconds": round(time.perf_counter() - started, 1),
        "cores": os.cpu_count(),
        "results": results,
    }))


if __name__ == "__main__":
    main()
