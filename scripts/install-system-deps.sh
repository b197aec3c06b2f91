#!/usr/bin/env bash
# Installs the servers the test suite starts privately (redis-server, memcached, a
# PostgreSQL cluster), and wrk and webdis (a peer: Debian's C HTTP front for Redis) for the
# benchmarks, from Debian packages, when missing.
# Idempotent: does nothing on a machine that has them.
set -euo pipefail

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v memcached >/dev/null || missing+=(memcached)
command -v wrk >/dev/null || missing+=(wrk)
command -v webdis >/dev/null || missing+=(webdis)
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    missing+=(postgresql)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
    echo "missing: ${missing[*]}; install them with your package manager" >&2
    exit 1
fi
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "installing ${missing[*]} from Debian packages" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# Installing the packages must not leave services of our own running: the tests start
# private servers on free ports.
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
