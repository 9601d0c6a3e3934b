#!/usr/bin/env bash
# A real one-node SLURM (Debian's slurm-wlm + munge) inside a network namespace
# that has only a loopback device, then the HPC tests inside it, then teardown.
# Recipe: shared/HPC-TESTING.md. Needs root. Usage: tests/hpc/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
STATE=$(mktemp -d /tmp/imgindex-hpc.XXXXXX)
chmod 755 "$STATE"
HOST=$(hostname -s)

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# 1. A namespace with only lo (plus an address, so getaddrinfo(AI_ADDRCONFIG)
#    resolves the host name); a holder process keeps it alive.
unshare -n sh -c 'ip link set lo up; ip addr add 10.255.0.1/32 dev lo; exec sleep infinity' &
HOLDER=$!
ns() { nsenter -t "$HOLDER" -n "$@"; }
grep -qE "^127\.0\.0\.1[[:space:]].*\b$HOST\b" /etc/hosts || echo "127.0.0.1 $HOST" >>/etc/hosts

MUNGE_PID=
cleanup() {
    set +e
    ns scancel --user=root >/dev/null 2>&1
    for f in /run/slurm/slurmctld.pid /run/slurm/slurmd.pid "$MUNGE_PID"; do
        [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null
    done
    sleep 1
    kill "$HOLDER" 2>/dev/null
    rm -rf "$STATE"
}
trap cleanup EXIT

# 2. munge, with its pid recorded so that only our daemon is stopped
mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
# (a munged already running is used as it is, and left running)
MUNGE_PID=/run/munge/imgindex-test-$$.pid
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=$MUNGE_PID"
munge -n | unmunge >/dev/null

# 3. slurm.conf for this machine, then the daemons inside the namespace
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 8 / 10 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /run/slurm /var/log/slurm
chown slurm /var/spool/slurmctld /var/log/slurm
sed -e "s/HOST/$HOST/g" -e "s/CPUS/$CPUS/g" -e "s/REALMEM/$MEM/" tests/hpc/slurm.conf >/etc/slurm/slurm.conf
# -c: no job of an earlier run that died (or ran beside this one) is recovered
ns slurmctld -c
ns slurmd
for _ in $(seq 30); do ns sinfo -h -o %T 2>/dev/null | grep -q idle && break; sleep 1; done
ns sinfo

# 4. the tests, inside the namespace; TMPDIR and the index on a plain folder
export IMGINDEX_HPC_TESTS=1 IMGINDEX_HPC_ROOT="$STATE" PATH="$ROOT/.venv/bin:$PATH"
ns "$PY" -m pytest -q -p no:cacheprovider tests/hpc "$@"
