#!/usr/bin/env bash
# scripts/gpu/arch-check.sh — the one-GPU check of a change of structure: every GPU test, the --device cuda
# process paths at TP=1, and Scout-4L batch-1 decode of the new build against an older one, in one call.
#
#   here:            bash scripts/gpu/test.sh; build the older binary into .gpubuild/old/tpfleet.gz
#   on the GPU:      run(command="bash scripts/gpu/arch-check.sh", carry=[".gpubuild"])
#
# Prints the three tables last; exit status non-zero when the tests or the process checks failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
# Most important first: a call cut short by its time limit keeps what it finished.
bash scripts/gpu/test.sh --run
tests=$?
ab=skipped
if [ -f .gpubuild/old/tpfleet.gz ]; then
	ROUNDS=${ROUNDS:-3} bash scripts/gpu/ab.sh --run .gpubuild/old/tpfleet.gz .gpubuild/tpfleet.gz
	ab=$?
fi
TP=1 bash scripts/gpu/multiproc.sh
procs=$?
echo "== arch-check: tests exit $tests, processes (TP=1) exit $procs, A/B bench exit $ab"
[ "$tests" = 0 ] && [ "$procs" = 0 ]
