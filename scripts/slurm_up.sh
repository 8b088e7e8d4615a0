#!/usr/bin/env bash
# A real single-node Slurm (slurmctld + slurmd + munged) on 127.0.0.1, for the launcher tests and for trying
# `pagoda launch slurm` on one machine. Root only: it installs Debian packages and runs the daemons as root.
#
#   bash scripts/slurm_up.sh [up|down|status]      (default: up)
#
# `up` is idempotent: it installs what is missing, writes the config, starts what is not running, waits until
# the node is idle, and restarts the daemons only when the config it would write has changed. Everything lives in
# PAGODA_SLURM_DIR (default /var/lib/pagoda-slurm): config, munge key and socket, state, spool, logs, PID files.
# `down` stops the daemons by their PID files. The last line printed by `up`/`status` is `SLURM_CONF=...`:
# export it (when /etc/slurm/slurm.conf is free, a link to the config is put there so plain `sbatch` works too).
#
# Env: PAGODA_SLURM_DIR, PAGODA_SLURM_CPUS (default: nproc), PAGODA_SLURM_PORT (slurmctld port, default 6817;
# slurmd uses the next one). Exit status: 0 ok, 1 failure, 3 the packages cannot be installed here.
# The test cluster is tuned for quick turnaround (cred_expire=10 s: a requeued job restarts ~10 s later instead
# of Slurm's default 121 s; 1-2 s scheduler intervals); keep that in mind before reusing the config elsewhere.
set -euo pipefail

ACTION="${1:-up}"
DIR="${PAGODA_SLURM_DIR:-/var/lib/pagoda-slurm}"
CONF="$DIR/slurm.conf"
CPUS="${PAGODA_SLURM_CPUS:-$(nproc)}"
PORT="${PAGODA_SLURM_PORT:-6817}"
NODE="$(hostname -s)"
SOCKET="$DIR/munge/munge.socket"
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "[slurm_up] $*" >&2; }
die() { say "error: $*"; exit 1; }

alive() {  # alive PIDFILE: the process named in PIDFILE runs
  local pid
  [ -s "$1" ] && pid="$(cat "$1")" && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

stop_pidfile() {  # stop_pidfile PIDFILE NAME: SIGTERM, wait up to 15 s, then SIGKILL
  local pid
  alive "$1" || { rm -f "$1"; return 0; }
  pid="$(cat "$1")"
  say "stopping $2 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$1"
}

render_conf() {
  # proctrack/linuxproc + task/none: no cgroups or systemd needed. NoInAddrAny: bind 127.0.0.1, never 0.0.0.0.
  # KillWait=5 keeps requeue/cancel quick; JobRequeue=1 lets batch jobs be requeued (preemption, scontrol).
  cat <<EOF
# Written by scripts/slurm_up.sh: a single-node Slurm on loopback.
ClusterName=pagoda
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET,cred_expire=10
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

install_packages() {
  # Exit status 3 when the packages cannot be installed (no apt, no package index): callers (the test fixture)
  # tell "Slurm unavailable here" apart from "Slurm is installed but does not start" (status 1).
  local missing=() p
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ "${#missing[@]}" -eq 0 ] && return 0
  command -v apt-get >/dev/null || { say "error: apt-get not found: install ${missing[*]} by hand"; exit 3; }
  say "installing ${missing[*]}"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    apt-get update -qq >/dev/null || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
      || { say "error: apt-get could not install ${missing[*]}"; exit 3; }
  fi
}

start_munge() {
  alive "$DIR/munge/munged.pid" && return 0
  mkdir -p "$DIR/munge" && chmod 0700 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    (umask 077 && dd if=/dev/urandom of="$DIR/munge/munge.key" bs=128 count=1 status=none)
  fi
  say "starting munged"
  # --force: munged refuses to run as root without it.
  munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
}

wait_idle() {
  local state
  for _ in $(seq 60); do
    state="$(SLURM_CONF="$CONF" sinfo -h -n "$NODE" -o %T 2>/dev/null || true)"
    case "$state" in
      idle*|mixed*|allocated*) return 0 ;;
      down*|drain*) SLURM_CONF="$CONF" scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  die "node $NODE did not become idle (state: ${state:-unknown}); see $DIR/log/"
}

link_etc_conf() {
  # Plain `sbatch` reads /etc/slurm/slurm.conf: link ours there unless someone else's config already lives there.
  mkdir -p /etc/slurm
  if [ -L /etc/slurm/slurm.conf ] || [ ! -e /etc/slurm/slurm.conf ]; then
    ln -sfn "$CONF" /etc/slurm/slurm.conf
  fi
}

cmd_up() {
  [ "$(id -u)" = 0 ] || die "must run as root (installs packages, runs munged/slurmctld/slurmd)"
  install_packages
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  local new
  new="$(render_conf)"
  if [ -f "$CONF" ] && [ "$(cat "$CONF")" != "$new" ]; then
    say "config changed: restarting the daemons"
    cmd_down
  fi
  [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new" ] || printf '%s\n' "$new" > "$CONF"
  start_munge
  if ! alive "$DIR/slurmctld.pid"; then say "starting slurmctld"; slurmctld -f "$CONF"; fi
  if ! alive "$DIR/slurmd.pid"; then say "starting slurmd"; slurmd -f "$CONF"; fi
  link_etc_conf
  wait_idle
  echo "SLURM_CONF=$CONF"
}

cmd_down() {
  stop_pidfile "$DIR/slurmd.pid" slurmd
  stop_pidfile "$DIR/slurmctld.pid" slurmctld
  stop_pidfile "$DIR/munge/munged.pid" munged
}

cmd_status() {
  local name file ok=0
  for name in munged slurmctld slurmd; do
    file="$DIR/$name.pid"; [ "$name" = munged ] && file="$DIR/munge/munged.pid"
    if alive "$file"; then say "$name: running (pid $(cat "$file"))"; else say "$name: not running"; ok=1; fi
  done
  [ "$ok" = 0 ] && echo "SLURM_CONF=$CONF"
  return "$ok"
}

case "$ACTION" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) die "unknown action '$ACTION' (use up, down or status)" ;;
esac
