"""test_man.py — the man pages render cleanly and document everything the programs accept.

The lists come from the source, not from this file: keypoold's and keypoolctl's getopt tables,
keypoolctl's command table, every *_names[] table of the config parser and the env file's
PROVIDER_<NAME>_* suffixes. A setting, option or command added without documentation fails here.
Settings announced for the parser but not yet in it (ANNOUNCED) must be documented already.

Environment (set by `make check`): KEYPOOL_SRCDIR (sources, man/*.scd), KEYPOOL_BUILDDIR (the
built pages in man/).
"""

import os
import re
import shutil
import subprocess
import unittest

SRCDIR = os.environ.get("KEYPOOL_SRCDIR") or os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILDDIR = os.environ.get("KEYPOOL_BUILDDIR") or SRCDIR
PAGES = ["keypoold.8", "keypoolctl.1", "keypool.conf.5", "keypool-env.5"]

# Which section of keypool.conf(5) documents each parser table; a table not named here must be
# documented somewhere in the page.
SECTIONS = {
    "top_level_names": "GLOBAL SETTINGS",
    "provider_names": "PROVIDERS",
    "pool_names": "POOLS",
    "key_group_names": "KEY GROUPS",
    "retry_names": "RETRY",
    "cluster_names": "CLUSTER",
}
# Settings other branches are adding to the parser (keypool issue #14): documented ahead.
ANNOUNCED = {
    "provider_names": ["ca_file", "ca_path", "proxy", "http2", "tls_verify"],
    "top_level_names": ["header_timeout", "body_min_rate", "body_budget", "admin_tokens"],
}


def source(name):
    with open(os.path.join(SRCDIR, "src", name), encoding="utf-8") as f:
        return f.read()


def getopt_table(text):
    """The long names and short letters of the file's `struct option options[]`."""
    table = re.search(r"struct option options\[\] = \{(.*?)\n\s*\{\s*\}", text, re.S)
    assert table, "no getopt table found"
    longs, shorts = [], []
    for name, val in re.findall(r'\{\s*"([a-z0-9-]+)",\s*\w+,\s*\w+,\s*([^}]+?)\s*\}', table.group(1)):
        longs.append("--" + name)
        m = re.fullmatch(r"'(\w)'", val)
        if m:
            shorts.append("-" + m.group(1))
    return longs, shorts


def name_tables():
    """{table name: [setting names]} for every `static const char *const X_names[]` of the parser."""
    tables = {}
    for f in sorted(os.listdir(os.path.join(SRCDIR, "src"))):
        if not (f.startswith("config") and f.endswith(".c")):
            continue
        for name, body in re.findall(r"static const char \*const (\w+_names)\[\]\s*=\s*\{(.*?)\};",
                                     source(f), re.S):
            tables.setdefault(name, []).extend(re.findall(r'"([^"]+)"', body))
    return tables


def render(page):
    """(plain text, stderr) of `man --warnings -l page`, in the C locale, wide, no pager."""
    env = dict(os.environ, LC_ALL="C", MANWIDTH="200", MANPAGER="cat", PAGER="cat")
    env.pop("MAN_KEEP_FORMATTING", None)
    p = subprocess.run(["man", "--warnings", "-l", page], env=env, capture_output=True, text=True)
    text = re.sub(r".\x08", "", p.stdout)
    return p.returncode, text, p.stderr


def scd_entries(text):
    """{section: {term: paragraph}} of an scdoc source: a term is a line `*name*...` followed by
    tab-indented lines."""
    out, section, term = {}, "", None
    for line in text.splitlines():
        if line.startswith("# "):
            section, term = line[2:].strip(), None
            out.setdefault(section, {})
            continue
        m = re.match(r"\*([A-Za-z0-9_-]+)\*", line)
        if m:
            term = m.group(1)
            out.setdefault(section, {})[term] = ""
        elif line.startswith("\t") and term:
            out[section][term] += line.strip() + " "
        elif not line.strip():
            continue
        else:
            term = None
    return out


@unittest.skipUnless(shutil.which("man") and shutil.which("groff"),
                     "man (man-db) and groff are needed: apt-get install man-db groff")
class ManPagesTest(unittest.TestCase):

    def page(self, name):
        path = os.path.join(BUILDDIR, "man", name)
        self.assertTrue(os.path.isfile(path), f"{path} is not built")
        return path

    def scd(self, name):
        with open(os.path.join(SRCDIR, "man", name + ".scd"), encoding="utf-8") as f:
            return f.read()

    def test_every_page_renders_without_warnings(self):
        for name in PAGES:
            with self.subTest(page=name):
                rc, text, err = render(self.page(name))
                self.assertEqual(rc, 0, err)
                self.assertEqual(err.strip(), "", f"{name}: man --warnings printed:\n{err}")
                self.assertIn("NAME", text)
                self.assertIn("SEE ALSO", text)

    def test_keypoold_page_has_every_option(self):
        longs, shorts = getopt_table(source("keypoold.c"))
        self.assertIn("--check-config", longs)
        _, text, _ = render(self.page("keypoold.8"))
        for opt in longs + shorts:
            with self.subTest(option=opt):
                self.assertRegex(text, r"(?<![\w-])" + re.escape(opt) + r"(?![\w-])")

    def test_keypoolctl_page_has_every_option_and_command(self):
        src = source("keypoolctl.c")
        longs, shorts = getopt_table(src)
        commands = re.findall(r'\{\s*"([a-z]+)",\s*\d+,\s*\d+,.*?cmd_\w+\s*\}', src)
        self.assertIn("status", commands)
        self.assertIn("names", commands)
        _, text, _ = render(self.page("keypoolctl.1"))
        for opt in longs + shorts:
            with self.subTest(option=opt):
                self.assertRegex(text, r"(?<![\w-])" + re.escape(opt) + r"(?![\w-])")
        documented = scd_entries(self.scd("keypoolctl.1")).get("COMMANDS", {})
        for cmd in commands:
            with self.subTest(command=cmd):
                self.assertIn(cmd, documented, f"keypoolctl command {cmd} has no entry in COMMANDS")
                self.assertRegex(text, r"(?m)^\s+" + cmd + r"\b")

    def test_keypool_conf_page_has_every_setting_with_its_default(self):
        tables = name_tables()
        for must in ("top_level_names", "provider_names", "pool_names", "retry_names"):
            self.assertIn(must, tables, "the parser's name tables were not found")
        for table, names in ANNOUNCED.items():
            tables[table] = tables.get(table, []) + [n for n in names if n not in tables.get(table, [])]
        entries = scd_entries(self.scd("keypool.conf.5"))
        _, text, _ = render(self.page("keypool.conf.5"))
        for table, names in tables.items():
            for name in names:
                with self.subTest(table=table, setting=name):
                    if table in SECTIONS:
                        where = entries.get(SECTIONS[table], {})
                    else:
                        where = {k: v for sec in entries.values() for k, v in sec.items()}
                    self.assertIn(name, where, f"{name} ({table}) is not documented"
                                  f" in {SECTIONS.get(table, 'keypool.conf(5)')}")
                    self.assertRegex(where[name], r"Default:|Required", f"{name}: no default given")
                    self.assertRegex(text, r"(?m)^\s+" + re.escape(name) + r"\b")
        self.assertIn("EXAMPLE", entries)

    def test_keypool_env_page_has_every_variable(self):
        suffixes = re.findall(r'#define ENV_\w+\s+"(_[A-Z_]+)"', source("config_env.c"))
        self.assertIn("_API_KEY", suffixes)
        _, text, _ = render(self.page("keypool-env.5"))
        for suffix in suffixes:
            with self.subTest(variable=suffix):
                self.assertIn("PROVIDER_<NAME>" + suffix, text)


if __name__ == "__main__":
    unittest.main(verbosity=2)
