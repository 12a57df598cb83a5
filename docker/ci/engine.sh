#!/usr/bin/env bash
# A Docker engine for CI and for developers' machines without one (Debian 12; see docs/image.md).
#
#   docker/ci/engine.sh install   apt-get the engine (Debian docker.io: dockerd + the 20.10 client at
#                                 /usr/bin/docker, whose built-in BuildKit handles RUN --mount) and debootstrap
#   docker/ci/engine.sh start     start dockerd in the background unless an engine already answers; wait for it
#   docker/ci/engine.sh stop      stop the dockerd this script started (by its recorded PID), nothing else
#   docker/ci/engine.sh status    say whether an engine answers
#
# State (PID file, dockerd.log) lives in $DOCKER_CI_DIR (default /tmp/docker-ci).
set -euo pipefail

DIR="${DOCKER_CI_DIR:-/tmp/docker-ci}"
PIDFILE="$DIR/dockerd.pid"
LOG="$DIR/dockerd.log"
CLIENT=/usr/bin/docker
DOCKERD=/usr/sbin/dockerd
START_TIMEOUT_S="${DOCKER_START_TIMEOUT_S:-60}"

say() { echo ">> engine: $*"; }
die() { echo "engine: $1" >&2; shift; for line in "$@"; do echo "  $line" >&2; done; exit 1; }

answers() { "$CLIENT" info >/dev/null 2>&1; }

install() {
    if [ -x "$DOCKERD" ] && [ -x "$CLIENT" ] && command -v debootstrap >/dev/null; then
        say "already installed: $("$CLIENT" --version)"
        return
    fi
    [ "$(id -u)" = 0 ] || die "installing the engine needs root" "run: sudo $0 install"
    say "installing docker.io containerd runc iptables debootstrap with apt-get (about 15 s)"
    local t0=$SECONDS
    local aptlog="${TMPDIR:-/tmp}/docker-ci-apt.log"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        docker.io containerd runc iptables debootstrap; } >"$aptlog" 2>&1 \
        || die "apt-get install of the Docker engine failed (log: $aptlog)" "$(tail -5 "$aptlog")"
    say "installed in $((SECONDS - t0)) s: $("$CLIENT" --version)"
}

start() {
    mkdir -p "$DIR"
    if answers; then
        say "an engine already answers on $("$CLIENT" context inspect -f '{{.Endpoints.docker.Host}}' 2>/dev/null || echo the default socket); not starting another"
        return
    fi
    [ -x "$DOCKERD" ] || die "no dockerd at $DOCKERD" "run: $0 install"
    say "starting dockerd (log: $LOG)"
    nohup "$DOCKERD" --storage-driver=overlay2 >"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    local t0=$SECONDS
    until answers; do
        if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
            rm -f "$PIDFILE"
            die "dockerd exited during start-up" "$(tail -5 "$LOG")"
        fi
        if [ $((SECONDS - t0)) -ge "$START_TIMEOUT_S" ]; then
            die "dockerd did not answer within $START_TIMEOUT_S s" "$(tail -5 "$LOG")"
        fi
        sleep 0.2
    done
    say "dockerd $(cat "$PIDFILE") ready in $((SECONDS - t0)) s: server $("$CLIENT" version -f '{{.Server.Version}}')"
}

stop() {
    if [ ! -f "$PIDFILE" ]; then
        say "no dockerd started by this script; nothing to stop"
        return
    fi
    local pid
    pid="$(cat "$PIDFILE")"
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != dockerd ]; then
        say "the recorded PID $pid is not a running dockerd any more; nothing to stop"
    elif kill -0 "$pid" 2>/dev/null; then
        say "stopping dockerd $pid"
        kill -TERM "$pid"
        for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            say "dockerd $pid still running after 30 s; sending SIGKILL"
            kill -KILL "$pid" || true
        fi
    fi
    rm -f "$PIDFILE"
}

status() {
    if answers; then say "engine answers: server $("$CLIENT" version -f '{{.Server.Version}}')"; else say "no engine answers"; return 1; fi
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
