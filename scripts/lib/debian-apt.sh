# Sourced by scripts that fetch Debian packages without touching the host's apt setup
# (scripts/vm/fetch-kernel.sh, scripts/abi/newer-headers.sh).
#
# private_apt NAME DIR SUITE...: sets the array `apt_opts` to a private apt configuration under DIR
# (its own source list, lists and cache) whose sources are SUITE main on the host's own Debian
# mirror, read at run time from the host's apt sources (never a host name written here);
# FASTLOOP_DEBIAN_MIRROR overrides it on hosts whose apt points elsewhere. NAME prefixes the error
# when no mirror can be found. DIR must be absolute: apt resolves relative Dir:: paths against
# /etc/apt.

debian_mirror() {
  local sources=/etc/apt/sources.list.d/debian.sources mirror="${FASTLOOP_DEBIAN_MIRROR:-}"
  if [ -z "$mirror" ] && [ -f "$sources" ]; then
    mirror="$(awk '/^URIs:/ { print $2; exit }' "$sources")"
  fi
  if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' \
      /etc/apt/sources.list)"
  fi
  echo "$mirror"
}

private_apt() {
  local name="$1" dir="$2" keyring=/usr/share/keyrings/debian-archive-keyring.gpg suite
  shift 2
  apt_mirror="$(debian_mirror)"
  if [ -z "$apt_mirror" ]; then
    echo "$name: cannot find the Debian mirror in /etc/apt/sources.list.d/debian.sources or" \
      "/etc/apt/sources.list (set FASTLOOP_DEBIAN_MIRROR)" >&2
    exit 1
  fi
  mkdir -p "$dir/lists/partial" "$dir/archives/partial"
  : >"$dir/sources.list"
  for suite in "$@"; do
    printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$apt_mirror" "$suite" >>"$dir/sources.list"
  done
  apt_opts=(
    -o "Dir::Etc::SourceList=$dir/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$dir/lists"
    -o "Dir::Cache=$dir"
    -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
    -o "Dir::State::status=/dev/null"
    # Downloads land in a root-owned temp dir that the _apt sandbox user could not write.
    -o "APT::Sandbox::User=root"
  )
}
