#!/usr/bin/env python3
"""The deployed env file (orche.env) read as it is: the six pools, their keys, their routes."""

import subprocess
import unittest

from kptest import KEYPOOLD, KeypoolTestCase, fake_secret, find_leaks, key_id, masked

# name, model, number of keys (1 primary + backups), base URL from the env file?
POOLS = [
    ("GLM45", "z-ai/glm-4.5", 3, True),
    ("GPTOSS", "openai/gpt-oss-120b", 2, False),
    ("LLAMA3", "meta-llama/llama-4-maverick", 2, True),
    ("KIMI", "moonshotai/kimi-k2", 3, False),
    ("QWEN3", "qwen/qwen3-235b-a22b", 2, True),
    ("FALCON", "tngtech/deepseek-r1t2-chimera", 2, False),
]


def write_env(keys, env_url):
    """An orche.env in the deployments' own style: export, both quotes, comments, noise."""
    k = keys
    return f"""# orche.env — provider keys for the orchestrator (fake keys for tests)

export PROVIDER_GLM45_API_KEY="{k['GLM45'][0]}"
export PROVIDER_GLM45_BACKUP_KEYS="{k['GLM45'][1]},{k['GLM45'][2]}"
export PROVIDER_GLM45_MODEL="z-ai/glm-4.5"
export PROVIDER_GLM45_BASE_URL="{env_url}"

# GPT-OSS on the default provider
PROVIDER_GPTOSS_MODEL='openai/gpt-oss-120b'
PROVIDER_GPTOSS_API_KEY='{k['GPTOSS'][0]}'
PROVIDER_GPTOSS_BACKUP_KEYS='{k['GPTOSS'][1]}'

ORCHE_LOG_LEVEL=info
   # an indented comment
PROVIDER_LLAMA3_API_KEY={k['LLAMA3'][0]}
PROVIDER_LLAMA3_BACKUP_KEYS={k['LLAMA3'][1]}
PROVIDER_LLAMA3_MODEL=meta-llama/llama-4-maverick
PROVIDER_LLAMA3_BASE_URL={env_url}

PROVIDER_KIMI_API_KEY="{k['KIMI'][0]}"   # primary
PROVIDER_KIMI_BACKUP_KEYS="{k['KIMI'][1]},{k['KIMI'][2]}"
PROVIDER_KIMI_MODEL="moonshotai/kimi-k2"

export PROVIDER_QWEN3_API_KEY='{k['QWEN3'][0]}'
export PROVIDER_QWEN3_BACKUP_KEYS='{k['QWEN3'][1]}'
export PROVIDER_QWEN3_MODEL='qwen/qwen3-235b-a22b'
export PROVIDER_QWEN3_BASE_URL='{env_url}'

PROVIDER_FALCON_API_KEY={k['FALCON'][0]}
PROVIDER_FALCON_BACKUP_KEYS="{k['FALCON'][1]}"
PROVIDER_FALCON_MODEL=tngtech/deepseek-r1t2-chimera
"""


class EnvFileTest(KeypoolTestCase):

    def setUp(self):
        # Two upstreams: the config's only provider, and the one the env file names.
        self.default_sim = self.start_sim()
        self.env_sim = self.start_sim()
        self.keys = {name: [fake_secret() for _ in range(n)] for name, _, n, _ in POOLS}
        self.kp = self.start_keypool(
            self.default_sim, env_file=write_env(self.keys, self.env_sim.base_url),
            secrets=[s for ks in self.keys.values() for s in ks])

    def sim_for(self, name):
        return self.env_sim if dict((p[0], p[3]) for p in POOLS)[name] else self.default_sim

    def test_key_status_lists_the_six_pools_with_their_keys_in_order(self):
        pools = {p["name"]: p for p in self.kp.key_status()["pools"]}
        self.assertEqual(set(pools), {p[0] for p in POOLS})
        for name, model, n, _ in POOLS:
            self.assertEqual(pools[name]["model"], model, name)
            self.assertEqual([k["id"] for k in pools[name]["keys"]],
                             [key_id(s) for s in self.keys[name]],
                             f"{name}: the primary first, then the backups in order")
            self.assertEqual([k["masked"] for k in pools[name]["keys"]],
                             [masked(s) for s in self.keys[name]], name)
            for k in pools[name]["keys"]:
                self.assertEqual((k["state"], k["requests"]), ("ready", 0))
        status, doc = self.kp.health()
        self.assertEqual(status, 200)
        self.assertEqual({p["name"]: p["keys"] for p in doc["pools"]},
                         {name: n for name, _, n, _ in POOLS})

    def test_each_model_routes_to_its_pool_and_primary_key(self):
        for name, model, _, _ in POOLS:
            status, h, body = self.kp.chat(model)
            self.assertEqual(status, 200, f"{model}: {body!r}")
            self.assertEqual(h.get("x-keypool-pool"), name)
            self.assertEqual(h.get("x-keypool-key"), key_id(self.keys[name][0]),
                             f"{name}: the primary key must go first")
            seen = self.sim_for(name).log()[-1]
            self.assertEqual((seen["key_id"], seen["model"]),
                             (key_id(self.keys[name][0]), model),
                             f"{name} must go to the upstream its env entries name")
        self.assertEqual(len(self.env_sim.log()), 3)
        self.assertEqual(len(self.default_sim.log()), 3)

    def test_pool_names_from_the_env_file_route_with_their_model_id(self):
        for name, model, _, _ in POOLS:
            status, h, body = self.kp.chat(name)
            self.assertEqual(status, 200, f"{name}: {body!r}")
            self.assertEqual(h.get("x-keypool-pool"), name)
            self.assertEqual(self.sim_for(name).log()[-1]["model"], model)

    def test_backups_serve_when_the_primary_is_rate_limited(self):
        glm = self.keys["GLM45"]
        self.env_sim.set_rules({glm[0]: {"status": 429, "retry_after": "60"}})
        status, h, body = self.kp.chat("z-ai/glm-4.5")
        self.assertEqual(status, 200, body)
        self.assertEqual(h.get("x-keypool-key"), key_id(glm[1]))

    def test_check_config_accepts_the_env_file(self):
        r = subprocess.run([KEYPOOLD, "--check-config", "-c", self.kp.config_path],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(find_leaks(self.kp.secrets, r.stdout + r.stderr, "the output"), [])


if __name__ == "__main__":
    unittest.main(verbosity=2)
