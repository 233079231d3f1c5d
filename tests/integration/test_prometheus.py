"""A real Prometheus server (Debian's) scrapes imdsd's /metrics on the health listener, answers a
query over its HTTP API with a count this test caused, and fires the example alerts of
container/prometheus/imdsd-alerts.yml (loaded with their `for:` shortened to 0s)."""
import json
import os
import re
import subprocess
import urllib.parse
import urllib.request

import harness
from harness import free_port, request, token_url, wait_for

ONLY_VARIANTS = ("plain",)   # Prometheus itself is the subject here; test_metrics.py covers the variants
PROMETHEUS = "/usr/bin/prometheus"
RULES = os.path.join(harness.HERE, "..", "..", "container", "prometheus", "imdsd-alerts.yml")


class Prometheus:
    def __init__(self, ctx, target):
        self.port = free_port()
        d = os.path.join(ctx.tmp, "prometheus")
        os.makedirs(d)
        with open(RULES) as f:
            rules = re.sub(r"for: \S+", "for: 0s", f.read())
        with open(os.path.join(d, "rules.yml"), "w") as f:
            f.write(rules)
        with open(os.path.join(d, "prometheus.yml"), "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "rule_files: [rules.yml]\n"
                    f"scrape_configs:\n  - job_name: imdsd\n    static_configs:\n      - targets: ['{target}']\n")
        self.log = open(os.path.join(d, "prometheus.log"), "w")
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={d}/prometheus.yml", f"--storage.tsdb.path={d}/data",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                     cwd=d, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        ctx.cleanups.append(self.stop)
        wait_for(self.ready, 20, "Prometheus to be ready")

    def ready(self):
        assert self.proc.poll() is None, f"prometheus exited {self.proc.returncode}: see {self.log.name}"
        try:
            return request(self.port, "/-/ready", timeout=1).status == 200
        except OSError:
            return False

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def scalar(self, query):
        """The value of a query with one series, or None."""
        res = self.api("query", query=query)["result"]
        return float(res[0]["value"][1]) if len(res) == 1 else None

    def firing(self):
        return {a["labels"]["alertname"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"}

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def test_prometheus_scrapes_imdsd_and_alerts_fire(ctx):
    hp = free_port()
    tok = ctx.token()
    tenant = ctx.tenant("ok-exp120")   # 2-minute tokens: under the expiring-soon threshold
    d = ctx.daemon(tenant, tok, extra=["--health-listen", f"127.0.0.1:{hp}"])
    prom = Prometheus(ctx, f"127.0.0.1:{hp}")
    wait_for(lambda: prom.scalar('up{job="imdsd"}') == 1, 15, "Prometheus's first scrape of imdsd")
    for _ in range(3):   # three requests without Metadata: three 400s
        assert request(d.port, token_url()).status == 400
    q = 'imdsd_http_requests_total{endpoint="token",code="400"}'
    wait_for(lambda: prom.scalar(q) == 3, 15, f"{q} == 3 in Prometheus")
    assert prom.scalar('imdsd_token_file_state{state="ok"}') == 1
    assert "ImdsdTokenFileNotOk" not in prom.firing()
    # a token that expires within 5 minutes, then a token file that disappears: both alerts fire
    assert harness.get_token(d.port).status == 200
    os.unlink(os.path.join(tok.root, "..data"))
    wait_for(lambda: {"ImdsdTokenExpiringSoon", "ImdsdTokenFileNotOk"} <= prom.firing(), 20,
             "the example alerts to fire")


test_prometheus_scrapes_imdsd_and_alerts_fire.timeout = 90
