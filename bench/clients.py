"""Round trips of real clients' defaults: Java's HttpClient and Node's http module.

``python -m bench.clients [--requests 2000] [--python PATH --cwd DIR]`` starts a sidecar
(the embedded default) and times, from each client's own process, one request after the
other on one kept-alive connection:

- Java 17+'s default ``HttpClient`` GETs an L1 hit; it sends ``Upgrade: h2c`` on every new
  connection's first request (which, before the front door served every route, handed the
  connection to aiohttp for good);
- Node's ``http`` module PUTs a body it streams, so with ``Transfer-Encoding: chunked``.

It prints the median and p99 round trip of each (µs). ``--python`` and ``--cwd`` run the
sidecar from another checkout and interpreter, to compare revisions in one run. Needs a
JDK (``javac``) and Node.js; a missing one is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests.servers import free_port

JAVA = """
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.util.Arrays;

public class Rtt {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        int count = Integer.parseInt(args[1]);
        HttpClient client = HttpClient.newHttpClient();  // the default: HTTP/2 over h2c
        HttpRequest request = HttpRequest.newBuilder(URI.create(url)).GET().build();
        long[] took = new long[count];
        for (int i = 0; i < count + 200; i++) {
            long started = System.nanoTime();
            HttpResponse<byte[]> response =
                client.send(request, HttpResponse.BodyHandlers.ofByteArray());
            if (response.statusCode() != 200)
                throw new RuntimeException("status " + response.statusCode());
            if (i >= 200) took[i - 200] = System.nanoTime() - started;  // after warm-up
        }
        Arrays.sort(took);
        System.out.println(took[count / 2] / 1000 + " " + took[count * 99 / 100] / 1000);
    }
}
"""

NODE = """
const http = require('http');
const [url, count] = [process.argv[2], Number(process.argv[3])];
const agent = new http.Agent({keepAlive: true, maxSockets: 1});
const took = [];
function once(i) {
  const started = process.hrtime.bigint();
  const request = http.request(url, {method: 'PUT', agent}, (response) => {
    response.resume();
    response.on('end', () => {
      if (response.statusCode !== 204) throw new Error('status ' + response.statusCode);
      if (i >= 200) took.push(Number(process.hrtime.bigint() - started) / 1000);
      if (i < count + 199) once(i + 1); else {
        took.sort((a, b) => a - b);
        console.log(Math.round(took[Math.floor(took.length / 2)]) + ' '
          + Math.round(took[Math.floor(took.length * 0.99)]));
        agent.destroy();
      }
    });
  });
  request.write('a streamed ');  // no Content-Length: chunked
  request.end('body');
}
once(0);
"""


def sidecar(python: str, cwd: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [python, "-m", "cachesvc", "serve", "--port", str(port)],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the sidecar did not start")


def java(url: str, count: int, work: Path) -> tuple[int, int] | None:
    if shutil.which("javac") is None or shutil.which("java") is None:
        print("java: no JDK (javac) here: skipped")
        return None
    (work / "Rtt.java").write_text(JAVA)
    subprocess.run(["javac", "Rtt.java"], cwd=work, check=True)
    out = subprocess.run(
        ["java", "-cp", str(work), "Rtt", url, str(count)], capture_output=True, check=True
    )
    median, p99 = map(int, out.stdout.split())
    return median, p99


def node(url: str, count: int, work: Path) -> tuple[int, int] | None:
    if shutil.which("node") is None:
        print("node: no Node.js here: skipped")
        return None
    (work / "rtt.js").write_text(NODE)
    out = subprocess.run(["node", "rtt.js", url, str(count)], cwd=work, capture_output=True)
    out.check_returncode()
    median, p99 = map(int, out.stdout.split())
    return median, p99


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.clients", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--python", default=sys.executable, help="the sidecar's interpreter")
    parser.add_argument("--cwd", type=Path, default=Path.cwd(), help="the sidecar's checkout")
    args = parser.parse_args(argv)
    port = free_port()
    process = sidecar(args.python, args.cwd, port)
    try:
        base = f"http://127.0.0.1:{port}/v1/cache/"
        urllib.request.urlopen(urllib.request.Request(base + "hit", b"v", method="PUT"))
        with tempfile.TemporaryDirectory(prefix="cachesvc-clients-") as work:
            for name, measure, url in (
                ("java HttpClient GET (h2c upgrade asked)", java, base + "hit"),
                ("node http PUT (chunked body)", node, base + "chunked"),
            ):
                result = measure(url, args.requests, Path(work))
                if result is not None:
                    print(f"{name}: median {result[0]} us, p99 {result[1]} us")
    finally:
        process.terminate()
        process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
