#!/usr/bin/env bash
# What a device call carries is the working tree: tracked plus untracked-not-ignored files, at most 64 MiB with
# the carried paths. bench/results alone is ~57 MiB (2026-12-07), so a call that carries wheels or the SGLang
# bundle does not fit. `on` drops bench/results from the index (the files stay on disk) and ignores it locally,
# so it does not travel; `off` restores both. Commit only after `off`.
#   bash bench/device_tree.sh on   # before the device calls; carry any result file a job reads by name
#   bash bench/device_tree.sh off  # after them
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
ex=.git/info/exclude
mkdir -p .git/info && touch $ex
case ${1:-} in
  on) git rm -r -q --cached bench/results; grep -qx '/bench/results/' $ex || printf '/bench/results/\n' >> $ex ;;
  off) sed -i '\#^/bench/results/$#d' $ex; git reset -q -- bench/results ;;
  *) echo "usage: $0 on|off"; exit 2 ;;
esac
git ls-files -co --exclude-standard -z | xargs -0 stat -c %s | awk '{s += $1} END {printf "%.2f MiB travel\n", s / 1048576}'
