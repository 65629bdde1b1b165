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
