# Helpers shared by the bench-*.sh scripts (source it; no side effects).

# best (smallest) of a list of numbers
best() { printf '%s\n' "$@" | sort -g | head -1; }
# median of a list of numbers
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# a / b with 2 decimals and an x (b = 0 counts as 0.001)
ratio() { awk "BEGIN{printf \"%.2fx\", $1 / ($2 > 0 ? $2 : 0.001)}"; }
