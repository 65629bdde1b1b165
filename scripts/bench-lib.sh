# Helpers shared by the bench-*.sh scripts (source it; no side effects).

# best (smallest) of a list of numbers
best() { printf '%s\n' "$@" | sort -g | head -1; }
# median of a list of numbers
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# a / b with 2 decimals and an x (b = 0 counts as 0.001)
ratio() { awk "BEGIN{printf \"%.2fx\", $1 / ($2 > 0 ? $2 : 0.001)}"; }

# One timed run of a command, its output thrown away: prints "wall user sys maxrss_KiB"
# (seconds, seconds, seconds, KiB) from /usr/bin/time. TIME_FILE must name a scratch file.
timed() {
  /usr/bin/time -f '%e %U %S %M' -o "$TIME_FILE" "$@" >/dev/null
  cat "$TIME_FILE"
}

# The syscalls of one run of a command (all threads), as "name count" pairs for the calls that
# move or place data (pread64 pwrite64 preadv pwritev read write copy_file_range fallocate
# lseek fsync fdatasync) and the total, on one line. Needs strace.
syscall_counts() {
  local f; f=$(mktemp)
  strace -c -f -o "$f" "$@" >/dev/null 2>&1 || { rm -f "$f"; echo "(strace failed)"; return; }
  awk '$NF ~ /^(pread64|pwrite64|preadv|pwritev|read|write|copy_file_range|fallocate|lseek|fsync|fdatasync|futex)$/ {
         printf "%s %s  ", $NF, $4 }
       $NF == "total" { printf "total %s", $4 }' "$f"
  echo
  rm -f "$f"
}

# One timed run of a command after removing the files named in the OUTS array and syncing the
# page cache (so that no run pays for the previous one's writeback): prints "secs peak_rss_KiB".
# W must name the work directory.
once() {
  rm -f "${OUTS[@]}"
  sync
  sleep 1
  /usr/bin/time -f '%e %M' -o "$W/time.txt" "$@" >/dev/null
  cat "$W/time.txt"
}

# rounds NAME...: REPS rounds (default 10) of the contestants NAME..., each run by the caller's
# function run_NAME, which prints "secs peak_rss_KiB"; round i starts with a different
# contestant (two of them alternate in both orders). Fills the arrays t_NAME (seconds, in run
# order) and the numbers rss_NAME (the largest peak RSS). A run that prints nothing (a failed
# check) ends the script.
rounds() {
  local names=("$@") n=$# i k who t r
  for who in "${names[@]}"; do
    eval "t_$who=()"
    eval "rss_$who=0"
  done
  for i in $(seq "${REPS:-10}"); do
    for k in $(seq 0 $((n - 1))); do
      who=${names[$(((i - 1 + k) % n))]}
      read -r t r < <("run_$who") || true
      if [ -z "$t" ] || [ -z "$r" ]; then echo "run_$who failed" >&2; exit 1; fi
      eval "t_$who+=(\"\$t\")"
      if [ "$r" -gt "$(eval "echo \$rss_$who")" ]; then eval "rss_$who=\$r"; fi
    done
  done
}

# times NAME: the runs of contestant NAME (after rounds), space-separated.
times_of() { eval "echo \"\${t_$1[*]}\""; }
