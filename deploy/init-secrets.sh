#!/bin/sh
# Makes deploy/secrets/ for compose.yaml: the keyring, PostgreSQL's password, a caller token
# and the broker's settings (broker.compose.toml with the password and the token's hash filled
# in). Existing files are kept, so running it again changes nothing. Needs `broker` (make
# install puts it in .venv/bin) and python3.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
broker=${BROKER:-$here/../.venv/bin/broker}
cd "$here"
mkdir -p secrets
umask 077
[ -s secrets/broker_keys ] || "$broker" keygen > secrets/broker_keys
[ -s secrets/postgres_password ] ||
  python3 -c 'import secrets; print(secrets.token_hex(24))' > secrets/postgres_password
[ -s secrets/app_token ] ||
  python3 -c 'import secrets; print("cb_" + secrets.token_urlsafe(32))' > secrets/app_token
hash=$("$broker" callers hash < secrets/app_token)
sed -e "s/@POSTGRES_PASSWORD@/$(cat secrets/postgres_password)/" \
    -e "s/@APP_TOKEN_SHA256@/$hash/" broker.compose.toml > secrets/broker.toml
# Compose bind-mounts secret files with their owner on this machine, and the image runs as
# uid 10001: the containers must be able to read them. The folder itself stays private.
chmod 0644 secrets/broker_keys secrets/postgres_password secrets/broker.toml
chmod 0700 secrets
echo "deploy/secrets/ ready; the caller token is in deploy/secrets/app_token"
