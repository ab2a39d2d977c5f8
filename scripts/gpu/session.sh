#!/usr/bin/env bash
# scripts/gpu/session.sh — several GPU scripts in one device call, most important first, within one deadline,
# so that a call cut short keeps what it finished and every result comes back in one archive.
#
#   bash scripts/gpu/test.sh                       here: build .gpubuild/
#   bash scripts/gpu/session.sh STEP [STEP ...]    on the GPU machine: run each STEP, a "name=command" pair
#                                                  (the command runs under bash from the repo root with OUT set
#                                                  to its own folder), in order, each bounded by what is left of
#                                                  DEADLINE seconds (default 540) and by its own LIMIT_<name>
#                                                  (seconds) when set; a step that would get less than 20 s is
#                                                  skipped. Every step's output and files go into
#                                                  $OUT/results.tgz; a table of steps (exit, seconds) is printed
#                                                  last. Exit status: the first failing step's.
#
# With the device tool, for example:
#   run(command="bash scripts/gpu/session.sh 'tests=bash scripts/gpu/test.sh --run' 'quant=bash scripts/gpu/quant_bench.sh'",
#       carry=[".gpubuild"])
set -uo pipefail
cd "$(dirname "$0")/../.."
[ $# -gt 0 ] || { echo "usage: $0 name=command ..." >&2; exit 2; }
final=${OUT:-$(mktemp -d)}
work=$(mktemp -d)
deadline=${DEADLINE:-540}
rc=0
summary="$work/session.txt"
: >"$summary"
for step in "$@"; do
	name=${step%%=*}
	cmd=${step#*=}
	left=$((deadline - SECONDS - 15))
	limit_var="LIMIT_$name"
	limit=${!limit_var:-$left}
	[ "$limit" -le "$left" ] || limit=$left
	if [ "$limit" -lt 20 ]; then
		printf '%-10s skipped (%d s left)\n' "$name" "$left" | tee -a "$summary"
		continue
	fi
	mkdir -p "$work/$name"
	start=$SECONDS
	echo "== $name (limit ${limit} s): $cmd"
	OUT="$work/$name" timeout -k 5 "$limit" bash -c "$cmd" >"$work/$name/log.txt" 2>&1
	st=$?
	tail -40 "$work/$name/log.txt"
	printf '%-10s exit %-3s %4d s\n' "$name" "$st" $((SECONDS - start)) | tee -a "$summary"
	[ "$st" = 0 ] || [ "$rc" != 0 ] || rc=$st
done
tar czf "$final/results.tgz" -C "$work" .
echo
echo "== session ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(date -u +%FT%TZ))"
cat "$summary"
exit $rc
