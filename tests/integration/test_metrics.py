#!/usr/bin/env python3
"""GET /metrics: the whole text parsed as the Prometheus text exposition format (0.0.4), and its
figures after the scripted scenario (kptest.StatusScenario)."""

import math
import re
import unittest

from kptest import (KeypoolTestCase, StatusScenario, fake_secret, find_leaks, key_id, masked,
                    wait_for)

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")
KEY_ID = re.compile(r"kp-[0-9a-f]{10}")

FAMILIES = {
    "keypool_requests_total": ("counter", {"pool", "key", "class"}),
    "keypool_key_state": ("gauge", {"pool", "key", "state"}),
    "keypool_key_cooldown_seconds": ("gauge", {"pool", "key"}),
    "keypool_rotations_total": ("counter", {"pool"}),
    "keypool_upstream_latency_seconds": ("histogram", {"pool"}),
    "keypool_tokens_total": ("counter", {"pool", "key", "direction"}),
    "keypool_provider_remaining_requests": ("gauge", {"pool", "key"}),
    "keypool_provider_remaining_tokens": ("gauge", {"pool", "key"}),
    "keypool_workers": ("gauge", set()),
    "keypool_in_flight_requests": ("gauge", set()),
    "keypool_up": ("gauge", set()),
}
CLASSES = ("ok", "rate_limited", "quota", "auth", "transient", "caller")


class ExpositionError(AssertionError):
    pass


def parse_value(text, where):
    if text in ("+Inf", "Inf"):
        return math.inf
    if text == "-Inf":
        return -math.inf
    if text == "NaN":
        return math.nan
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
        raise ExpositionError(f"{where}: {text!r} is not a float")
    return float(text)


def parse_labels(text, pos, where):
    """Parses '{a="x",b="y"}' from text[pos] == '{'; returns (labels, position after '}')."""
    labels = {}
    pos += 1
    while True:
        if text.startswith("}", pos):
            return labels, pos + 1
        m = LABEL_NAME.match(text, pos)
        if not m:
            raise ExpositionError(f"{where}: bad label name at {text[pos:pos + 20]!r}")
        name = m.group(0)
        pos = m.end()
        if not text.startswith('="', pos):
            raise ExpositionError(f"{where}: label {name} lacks =\"")
        pos += 2
        value = []
        while True:
            if pos >= len(text):
                raise ExpositionError(f"{where}: unterminated value of label {name}")
            ch = text[pos]
            if ch == "\\":
                nxt = text[pos + 1:pos + 2]
                if nxt not in ("\\", '"', "n"):
                    raise ExpositionError(f"{where}: bad escape \\{nxt} in label {name}")
                value.append("\n" if nxt == "n" else nxt)
                pos += 2
            elif ch == '"':
                pos += 1
                break
            else:
                value.append(ch)
                pos += 1
        if name in labels:
            raise ExpositionError(f"{where}: label {name} given twice")
        labels[name] = "".join(value)
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("}", pos):
            raise ExpositionError(f"{where}: expected , or }} after label {name}")


def family_of(name, types):
    """The declared family a sample name belongs to, or None."""
    if name in types and types[name] in ("counter", "gauge", "untyped", "summary"):
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            base = name[:-len(suffix)]
            if types.get(base) == "histogram" or (types.get(base) == "summary"
                                                  and suffix != "_bucket"):
                return base
    if types.get(name) == "histogram":
        return None             # a histogram has no bare sample
    return None


def parse_exposition(text):
    """Parses Prometheus text format 0.0.4 strictly enough to catch a broken exporter.

    Returns {family: {"type", "help", "samples": [(name, labels, value)]}}. Raises
    ExpositionError naming the line for: a sample whose family has no TYPE (or whose TYPE comes
    after it), HELP/TYPE given twice or after the family's samples, a family's samples not
    together, bad names, label syntax or values, duplicate series, histograms whose buckets are
    not cumulative or do not end with le="+Inf" equal to _count, or a missing final newline."""
    if text and not text.endswith("\n"):
        raise ExpositionError("the text does not end with a newline")
    families = {}
    types = {}
    seen_series = set()
    finished = set()            # families whose block of samples is over
    current = None
    for n, line in enumerate(text.split("\n")[:-1] if text else [], 1):
        where = f"line {n} ({line[:80]!r})"
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                kind, name = parts[1], parts[2]
                if not METRIC_NAME.fullmatch(name):
                    raise ExpositionError(f"{where}: bad metric name")
                fam = families.setdefault(name, {"type": None, "help": None, "samples": []})
                if fam["samples"] or name in finished:
                    raise ExpositionError(f"{where}: {kind} after the family's samples")
                if kind == "TYPE":
                    if fam["type"] is not None:
                        raise ExpositionError(f"{where}: TYPE given twice")
                    if len(parts) != 4 or parts[3] not in TYPES:
                        raise ExpositionError(f"{where}: bad type")
                    fam["type"] = parts[3]
                    types[name] = parts[3]
                else:
                    if fam["help"] is not None:
                        raise ExpositionError(f"{where}: HELP given twice")
                    fam["help"] = parts[3] if len(parts) == 4 else ""
            continue
        m = METRIC_NAME.match(line)
        if not m:
            raise ExpositionError(f"{where}: bad sample name")
        name = m.group(0)
        pos = m.end()
        labels = {}
        if line.startswith("{", pos):
            labels, pos = parse_labels(line, pos, where)
        rest = line[pos:]
        if not rest.startswith(" "):
            raise ExpositionError(f"{where}: no space before the value")
        fields = rest.split()
        if len(fields) not in (1, 2):
            raise ExpositionError(f"{where}: expected a value and an optional timestamp")
        value = parse_value(fields[0], where)
        if len(fields) == 2 and not re.fullmatch(r"-?\d+", fields[1]):
            raise ExpositionError(f"{where}: bad timestamp")
        fam_name = family_of(name, types)
        if fam_name is None:
            raise ExpositionError(f"{where}: the sample's family has no TYPE line before it")
        if fam_name != current:
            if fam_name in finished:
                raise ExpositionError(f"{where}: the samples of {fam_name} are not together")
            if current is not None:
                finished.add(current)
            current = fam_name
        series = (name, tuple(sorted(labels.items())))
        if series in seen_series:
            raise ExpositionError(f"{where}: the series is given twice")
        seen_series.add(series)
        families[fam_name]["samples"].append((name, labels, value))
    for name, fam in families.items():
        if fam["type"] == "histogram":
            check_histogram(name, fam["samples"])
    return families


def check_histogram(name, samples):
    groups = {}
    for sname, labels, value in samples:
        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        g = groups.setdefault(rest, {"buckets": [], "sum": None, "count": None})
        if sname == name + "_bucket":
            if "le" not in labels:
                raise ExpositionError(f"{name}_bucket{dict(rest)} without le")
            g["buckets"].append((parse_value(labels["le"], f"{name} le"), value))
        elif sname == name + "_sum":
            g["sum"] = value
        else:
            g["count"] = value
    for rest, g in groups.items():
        what = f"{name}{dict(rest)}"
        b = g["buckets"]
        if not b or g["count"] is None or g["sum"] is None:
            raise ExpositionError(f"{what}: buckets, _sum and _count are all needed")
        les = [le for le, _ in b]
        if les != sorted(les) or len(set(les)) != len(les):
            raise ExpositionError(f"{what}: le bounds not increasing: {les}")
        if les[-1] != math.inf:
            raise ExpositionError(f"{what}: the last bucket is not le=\"+Inf\"")
        counts = [v for _, v in b]
        if counts != sorted(counts):
            raise ExpositionError(f"{what}: buckets are not cumulative: {counts}")
        if counts[-1] != g["count"]:
            raise ExpositionError(f"{what}: +Inf bucket {counts[-1]} != _count {g['count']}")
        if g["sum"] < 0:
            raise ExpositionError(f"{what}: negative _sum")


class ParserSelfTest(unittest.TestCase):
    """The parser must itself refuse what it is meant to catch."""

    GOOD = ('# HELP x_total Things.\n# TYPE x_total counter\nx_total{a="1",b="q\\"x"} 3\n'
            '# HELP h Latency.\n# TYPE h histogram\nh_bucket{le="0.1"} 1\nh_bucket{le="+Inf"} 2\n'
            'h_sum 0.3\nh_count 2\n')

    def test_good_text_parses(self):
        f = parse_exposition(self.GOOD)
        self.assertEqual(f["x_total"]["samples"], [("x_total", {"a": "1", "b": 'q"x'}, 3.0)])

    def test_broken_texts_are_refused(self):
        for bad in ("y 1\n",
                    '# TYPE x_total counter\nx_total{a=1} 3\n',
                    "# TYPE h histogram\nh_bucket{le=\"0.1\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
                    "h_sum 1\nh_count 1\n",
                    "# TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_sum 1\nh_count 1\n",
                    "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
                    "# TYPE g gauge\ng one\n",
                    "# TYPE g gauge\ng 1\ng 2\n",
                    "# TYPE g gauge\ng 1\n# TYPE g gauge\n",
                    "# TYPE g gauge\ng 1",
                    "# TYPE g gauge\n# TYPE k gauge\ng 1\nk 1\ng{a=\"b\"} 1\n"):
            with self.subTest(bad=bad):
                with self.assertRaises(ExpositionError):
                    parse_exposition(bad)


class MetricsTest(KeypoolTestCase):

    def scrape(self, kp):
        status, h, body = kp.request("GET", "/metrics")
        self.assertEqual(status, 200, body[:300])
        ctype = h.get("content-type", "")
        self.assertTrue(ctype.startswith("text/plain"), ctype)
        self.assertIn("version=0.0.4", ctype)
        text = body.decode("utf-8")
        try:
            families = parse_exposition(text)
        except ExpositionError as e:
            self.fail(f"/metrics is not valid exposition text: {e}\n{text}")
        return text, families

    def check_families(self, families, key_ids):
        for name, (kind, labels) in FAMILIES.items():
            if name in ("keypool_provider_remaining_requests",
                        "keypool_provider_remaining_tokens") and name not in families:
                continue
            self.assertIn(name, families, f"no family {name}")
            fam = families[name]
            self.assertEqual(fam["type"], kind, name)
            self.assertTrue(fam["help"], f"{name} has no HELP text")
            for sname, lab, _ in fam["samples"]:
                self.assertEqual(set(lab) - {"le"}, labels, f"{sname}{lab}")
                if "key" in lab:
                    self.assertRegex(lab["key"], KEY_ID, "keys are labelled by id only")
                    self.assertIn(lab["key"], key_ids)
                if "class" in lab:
                    self.assertIn(lab["class"], CLASSES)
        for fam in families.values():
            for _, lab, value in fam["samples"]:
                self.assertFalse(math.isnan(value), lab)

    @staticmethod
    def value(families, name, **labels):
        """The value of the one sample named name with exactly these labels (None if absent)."""
        found = [v for fam in families.values() for s, lab, v in fam["samples"]
                 if s == name and lab == labels]
        return found[0] if found else None

    def test_metrics_after_the_scenario(self):
        sc = StatusScenario(self).run()
        kp, sim = sc.kp, sc.sim
        A, B, C, D = (key_id(s) for s in (sc.a, sc.b, sc.c, sc.d))
        # keypool's own probes (GET …/models, one confirming c's 401) are not proxied attempts.
        log = [e for e in sim.finished_log() if e["method"] == "POST"]
        alpha_ids = {A, B}
        alpha_attempts = sum(1 for e in log if e["key_id"] in alpha_ids)
        beta_attempts = len(log) - alpha_attempts

        # Latency is observed as attempts end: wait until the figures have caught up.
        def caught_up():
            text, fam = self.scrape(kp)
            n = self.value(fam, "keypool_upstream_latency_seconds_count", pool="beta")
            return (text, fam) if n == beta_attempts else None
        text, f = wait_for(caught_up, what=f"{beta_attempts} latency observations for beta")
        ids = {key_id(s) for s in kp.secrets}
        self.check_families(f, ids)

        v = lambda name, **lab: self.value(f, name, **lab)     # noqa: E731
        req = lambda pool, key, cls: self.value(                # noqa: E731
            f, "keypool_requests_total", **{"pool": pool, "key": key, "class": cls})
        self.assertEqual(req("alpha", A, "rate_limited"), 1)
        self.assertIn(req("alpha", A, "ok"), (None, 0))
        b_ok = sum(1 for e in log if e["key_id"] == B and e["status"] == 200)
        self.assertEqual(req("alpha", B, "ok"), b_ok)
        self.assertEqual(req("beta", C, "auth"), 1)
        self.assertEqual(req("beta", D, "rate_limited"), 1)
        self.assertEqual(req("beta", sc.transient_key, "transient"), 1)

        state = lambda pool, key, st: self.value(               # noqa: E731
            f, "keypool_key_state", pool=pool, key=key, state=st)
        self.assertEqual([state("alpha", A, s) for s in ("ready", "cooling", "disabled")],
                         [0, 1, 0])
        self.assertEqual([state("alpha", B, s) for s in ("ready", "cooling", "disabled")],
                         [1, 0, 0])
        self.assertEqual([state("beta", C, s) for s in ("ready", "cooling", "disabled")],
                         [0, 0, 1])
        self.assertEqual(state("beta", D, "ready"), 1)

        cool_a = v("keypool_key_cooldown_seconds", pool="alpha", key=A)
        self.assertIsNotNone(cool_a)
        self.assertTrue(0 < cool_a <= 121, cool_a)
        self.assertEqual(v("keypool_key_cooldown_seconds", pool="alpha", key=B), 0)
        self.assertEqual(v("keypool_key_cooldown_seconds", pool="beta", key=D), 0)

        self.assertGreaterEqual(v("keypool_rotations_total", pool="alpha"), 1)
        self.assertGreaterEqual(v("keypool_rotations_total", pool="beta"), 2,
                                "c's 401 and d's 429 each moved a request")

        self.assertEqual(v("keypool_upstream_latency_seconds_count", pool="alpha"),
                         alpha_attempts)
        self.assertGreater(self.value(f, "keypool_upstream_latency_seconds_sum", pool="alpha"), 0)

        self.assertEqual(v("keypool_tokens_total", pool="alpha", key=B, direction="in"),
                         10 * b_ok)
        self.assertEqual(v("keypool_tokens_total", pool="alpha", key=B, direction="out"),
                         5 * b_ok)
        self.assertEqual(v("keypool_provider_remaining_requests", pool="alpha", key=B), 42)
        self.assertEqual(v("keypool_provider_remaining_tokens", pool="alpha", key=B), 9000)
        self.assertIsNone(v("keypool_provider_remaining_requests", pool="alpha", key=A),
                          "only keys that reported figures have them")

        self.assertEqual(v("keypool_workers"), sc.settings["workers"])
        self.assertEqual(v("keypool_up"), 1)
        self.assertGreaterEqual(v("keypool_in_flight_requests"), 0)

        for s in kp.secrets:
            self.assertNotIn(masked(s), text, "keys are labelled by id only")
        for fam in f.values():
            for _, lab, _ in fam["samples"]:
                self.assertFalse([x for x in lab.values() if "..." in x], lab)
        self.assertEqual(find_leaks(kp.secrets, text, "/metrics"), [])

    def test_metrics_of_an_idle_daemon_are_valid(self):
        a, b = fake_secret(), fake_secret()
        sim = self.start_sim()
        kp = self.start_keypool(sim, pools=[{"name": "solo", "model": "m/solo", "keys": [a, b]}],
                                settings={"workers": 3})
        # /health answers as soon as the first worker serves; the coordinator may still be
        # forking the others, so wait for all three before reading the figures.
        wait_for(lambda: self.value(self.scrape(kp)[1], "keypool_workers") == 3,
                 what="all 3 workers to be counted in /metrics")
        text, f = self.scrape(kp)
        self.check_families(f, {key_id(a), key_id(b)})
        for kid in (key_id(a), key_id(b)):
            self.assertEqual(self.value(f, "keypool_key_state", pool="solo", key=kid,
                                        state="ready"), 1)
            self.assertEqual(self.value(f, "keypool_key_cooldown_seconds", pool="solo",
                                        key=kid), 0)
        self.assertEqual(self.value(f, "keypool_workers"), 3)
        self.assertEqual(self.value(f, "keypool_up"), 1)
        self.assertEqual(self.value(f, "keypool_upstream_latency_seconds_count", pool="solo"), 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
