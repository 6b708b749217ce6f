#!/usr/bin/env bash
# Deploy DeeperHub to one server over SSH, with rollback on a failed health check.
#
#   ./deploy.sh production
#
# Required environment:
#   DEPLOY_HOST           server name or address
#   DEPLOY_USER           SSH user; owns DEPLOY_DIR and runs DeeperHub
#   DEPLOY_DIR            absolute install folder on the server, e.g. /opt/deeperhub
#   GUARDIAN_SECRET_KEY   JWT signing key, at least 32 bytes of [A-Za-z0-9._~+/=-]
#                         (bin/deeperhub gen-secret prints one)
# Optional environment:
#   DEPLOY_SSH_OPTS        extra ssh options, split on spaces, e.g. "-p 2222 -i key"
#   DEPLOY_RELEASE         tarball from bin/deeperhub-release to deploy (default:
#                          build one now)
#   DEPLOY_PORT            HTTP port on the server, stored as PORT in the settings
#                          file (default: keep the stored one, else 8080)
#   DEPLOY_PYTHON          Python 3.11 on the server for bin/deeperhub-setup
#   DEPLOY_HEALTH_TIMEOUT  seconds to wait for GET /health to return 200 (default 60)
#   DEPLOY_KEEP_RELEASES   release folders kept on the server (default 5)
#   DEPLOY_KEEP_BACKUPS    pre-deploy database copies kept (default 5)
#   DEPLOY_SYSTEMD_UNIT    restart through `systemctl` with this unit instead of
#                          bin/deeperhub stop and daemon
#
# Layout on the server (docs/operations.md explains it):
#   DEPLOY_DIR/releases/<time>-<name>/  one folder per deploy, with its own .venv
#   DEPLOY_DIR/current                  symlink to the release that runs
#   DEPLOY_DIR/shared/var/              database, logs, pidfile and sockets; each
#                                       release's var/ is a symlink to it
#   DEPLOY_DIR/shared/deeperhub.env     settings as environment variables (mode 600)
#   DEPLOY_DIR/shared/backups/          database copies taken before each switch
#
# Running it again deploys a new release folder; an interrupted run leaves the
# running release in place, and the next run cleans up after it.
set -euo pipefail

root=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)

fail() {
  echo "deploy: $*" >&2
  exit 1
}

if [ $# -ne 1 ] || [ "$1" != production ]; then
  echo "usage: ./deploy.sh production   (see the comment at the top of deploy.sh)" >&2
  exit 2
fi

: "${DEPLOY_HOST:?missing DEPLOY_HOST: set the server to deploy to}"
: "${DEPLOY_USER:?missing DEPLOY_USER: set the SSH user on the server}"
: "${DEPLOY_DIR:?missing DEPLOY_DIR: set the install folder, e.g. /opt/deeperhub}"
: "${GUARDIAN_SECRET_KEY:?missing GUARDIAN_SECRET_KEY: generate one with bin/deeperhub gen-secret}"
case "$DEPLOY_DIR" in
  /*) ;;
  *) fail "invalid DEPLOY_DIR '$DEPLOY_DIR': must be an absolute path" ;;
esac
# The key is written into a settings file that bash and systemd both parse, so
# it is limited to characters that need no quoting in either.
if [ "${#GUARDIAN_SECRET_KEY}" -lt 32 ]; then
  fail "invalid GUARDIAN_SECRET_KEY: ${#GUARDIAN_SECRET_KEY} bytes, production" \
    "needs at least 32 (generate one with bin/deeperhub gen-secret)"
fi
if [[ ! "$GUARDIAN_SECRET_KEY" =~ ^[A-Za-z0-9._~+/=-]+$ ]]; then
  fail "invalid GUARDIAN_SECRET_KEY: only A-Z a-z 0-9 . _ ~ + / = - are allowed" \
    "(generate one with bin/deeperhub gen-secret)"
fi
if [ -n "${DEPLOY_PORT:-}" ] && [[ ! "$DEPLOY_PORT" =~ ^[0-9]+$ ]]; then
  fail "invalid DEPLOY_PORT '$DEPLOY_PORT': expected a TCP port number"
fi
for name in DEPLOY_HEALTH_TIMEOUT DEPLOY_KEEP_RELEASES DEPLOY_KEEP_BACKUPS; do
  value=${!name:-}
  if [ -n "$value" ] && [[ ! "$value" =~ ^[1-9][0-9]*$ ]]; then
    fail "invalid $name '$value': expected a positive integer"
  fi
done

read -r -a ssh_opts <<< "${DEPLOY_SSH_OPTS:-}"
target="$DEPLOY_USER@$DEPLOY_HOST"
remote() {
  ssh -o BatchMode=yes "${ssh_opts[@]}" "$target" "$@"
}

work=$(mktemp -d "${TMPDIR:-/tmp}/deeperhub-deploy.XXXXXX")
trap 'rm -rf "$work"' EXIT

if [ -n "${DEPLOY_RELEASE:-}" ]; then
  [ -f "$DEPLOY_RELEASE" ] || fail "DEPLOY_RELEASE '$DEPLOY_RELEASE' is not a file"
  tarball=$DEPLOY_RELEASE
else
  tarball=$("$root/bin/deeperhub-release" --output "$work" | tail -n 1)
fi
name=$(basename "$tarball" .tar.gz)
release_id="$(date -u +%Y%m%dT%H%M%SZ)-$name"
upload="$DEPLOY_DIR/releases/.upload-$release_id.tar.gz"

echo "deploy: uploading $name to $target:$DEPLOY_DIR" >&2
remote "mkdir -p $(printf %q "$DEPLOY_DIR/releases") && cat > $(printf %q "$upload")" \
  < "$tarball"

# The remote script gets its parameters as assignments in front of its text, so
# the key never appears on a command line (visible in `ps`).
{
  printf 'DEPLOY_DIR=%q\n' "$DEPLOY_DIR"
  printf 'RELEASE_ID=%q\n' "$release_id"
  printf 'UPLOAD=%q\n' "$upload"
  printf 'SECRET_KEY=%q\n' "$GUARDIAN_SECRET_KEY"
  printf 'APP_PORT=%q\n' "${DEPLOY_PORT:-}"
  printf 'SETUP_PYTHON=%q\n' "${DEPLOY_PYTHON:-}"
  printf 'HEALTH_TIMEOUT=%q\n' "${DEPLOY_HEALTH_TIMEOUT:-60}"
  printf 'KEEP_RELEASES=%q\n' "${DEPLOY_KEEP_RELEASES:-5}"
  printf 'KEEP_BACKUPS=%q\n' "${DEPLOY_KEEP_BACKUPS:-5}"
  printf 'SYSTEMD_UNIT=%q\n' "${DEPLOY_SYSTEMD_UNIT:-}"
  cat "$root/bin/deeperhub-deploy-remote"
} | remote "bash -s"
