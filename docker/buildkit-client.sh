#!/usr/bin/env bash
# Print the docker client `make build` uses: one that builds with BuildKit (docker/Dockerfile needs RUN --mount).
#
#   docker/buildkit-client.sh            the first that can: `docker` from PATH, then the engine's own client
#                                        /usr/bin/docker (Debian/Ubuntu's docker.io package)
#   docker/buildkit-client.sh CLIENT     CLIENT itself (DOCKER set by the user), if it can
#
# A client can when it has the buildx plugin (from Docker 23 on, `docker build` is buildx), or when it is older
# than 23 (its own `build` then uses the engine's built-in BuildKit, with DOCKER_BUILDKIT=1). Prints the client
# on stdout; when there is none, one line on stderr saying what to install or set, and exit 1.
set -uo pipefail

ENGINE_CLIENT=/usr/bin/docker

version_of() {  # "28.2.2" from "Docker version 28.2.2, build e6534b4"; empty when $1 is no docker client
    local line
    line="$("$1" --version 2>/dev/null)" || return 0
    [[ "$line" =~ ^Docker\ version\ ([0-9][^ ,]*) ]] && echo "${BASH_REMATCH[1]}"
    return 0
}

can_build() {
    local version
    version="$(version_of "$1")"
    [ -n "$version" ] || return 1
    "$1" buildx version >/dev/null 2>&1 && return 0
    [ "${version%%.*}" -lt 23 ] 2>/dev/null
}

problem_of() {  # what is wrong with client $1 and how to fix it there (a phrase; the caller adds the other way)
    local version
    version="$(version_of "$1")"
    if [ -z "$version" ]; then
        echo "$1 is not a docker client (\`$1 --version\` does not say 'Docker version')"
    else
        echo "$1 is Docker $version without the buildx plugin, so it cannot build with BuildKit: install the plugin (docker-buildx-plugin)"
    fi
}

if [ $# -gt 0 ]; then
    if can_build "$1"; then
        echo "$1"
        exit 0
    fi
    other="set DOCKER to a client that has buildx"
    if [ "$1" != "$ENGINE_CLIENT" ] && can_build "$ENGINE_CLIENT"; then
        other="set DOCKER=$ENGINE_CLIENT (the engine's own client, which can)"
    fi
    [ -n "$(version_of "$1")" ] && joint=", or" || joint=":"
    echo "make build: DOCKER=$(problem_of "$1")$joint $other" >&2
    exit 1
fi

for client in docker "$ENGINE_CLIENT"; do
    if can_build "$client"; then
        echo "$client"
        exit 0
    fi
done
if command -v docker >/dev/null 2>&1; then
    problem="docker on PATH: $(problem_of docker)"
else
    problem="there is no docker on PATH: install Docker 23+ with its buildx plugin"
fi
echo "make build: no docker client here builds with BuildKit; $problem, or set DOCKER=/path/to/a/client that has it" >&2
exit 1
