#!/usr/bin/env bash
# A job submitted to a fresh single-machine Ray head under Ray's token authentication: the README's
# "On a cluster" sequence, runnable as it is.
#
#   bash deploy/submit_local.sh python jobs/main.py --config configs/smoke.yaml
#
# Stop the head afterwards with `ray stop`. tests/test_train.py runs this file unchanged against a head of its
# own: RAY_HEAD_OPTIONS gives that head free ports and its own temp dir, RAY_API_SERVER_ADDRESS points
# `ray job submit` at it, and a temporary HOME keeps its token out of the machine's ~/.ray.
set -euo pipefail

# One authentication mode for this shell's Ray commands and every process they start. `ray start` turns token
# authentication on by itself whenever ~/.ray/auth_token exists (any local `ray.init()` writes one), but
# `ray job submit` sends the token only when RAY_AUTH_MODE=token: without this line such a head refuses the
# job with "Missing authentication token".
export RAY_AUTH_MODE=token
# The token (~/.ray/auth_token), made if missing: a head in token mode does not start without one. It is
# printed on stdout, kept off the terminal here.
ray get-auth-token --generate > /dev/null
# shellcheck disable=SC2086  # RAY_HEAD_OPTIONS is a list of options, split on purpose
ray start --head ${RAY_HEAD_OPTIONS:-}
ray job submit --working-dir . -- "$@"
