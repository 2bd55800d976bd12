#!/bin/sh
# keypool from the shell: curl and keypoolctl one-liners (each line works on its own).
#   KEYPOOL_SOCKET=/run/keypool/keypool.sock sh examples/shell.sh
set -e
S=${KEYPOOL_SOCKET:-/run/keypool/keypool.sock}
M=${KEYPOOL_MODEL:-z-ai/glm-4.5}

# A chat completion (the pool is chosen by "model"; keypool adds the key).
curl -sS --fail-with-body --unix-socket "$S" http://keypool/v1/chat/completions \
     -H 'Content-Type: application/json' \
     -d "{\"model\":\"$M\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"
echo
# The same, streamed (server-sent events as they arrive).
curl -sS -N --fail-with-body --unix-socket "$S" http://keypool/v1/chat/completions \
     -H 'Content-Type: application/json' \
     -d "{\"model\":\"$M\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"
# Health and every key's state.
curl -sS --fail-with-body --unix-socket "$S" http://keypool/health
echo
curl -sS --fail-with-body --unix-socket "$S" http://keypool/api/key-status
echo
keypoolctl -s "$S" status
keypoolctl -s "$S" keys
keypoolctl -s "$S" --json health
