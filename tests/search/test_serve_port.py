"""`mmca serve` says "ready" only once its socket is bound and listening: the URL it prints
answers at once. A port another program holds is a clean error naming the port, and nothing
says "ready"."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request

from mmca.cli import main


def test_a_busy_port_is_a_clean_error_naming_it(index_dir, capsys):
    with socket.socket() as holder:  # another program listening on the port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", "--index", str(index_dir), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert f"port {port} on 127.0.0.1 is in use by another program" in err and "--port" in err
    assert "ready" not in out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_url_printed_as_ready_answers_at_once(index_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mmca", "serve", "--index", str(index_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        line = ""
        while "ready" not in line:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-3000:]  # the server ended before it was ready
        url = line.rsplit(" ", 1)[1].strip()
        assert url == f"http://127.0.0.1:{port}/"
        with urllib.request.urlopen(url + "api/info", timeout=60) as resp:  # no retry: it must answer now
            assert resp.status == 200 and json.load(resp)["images"] == 20
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
