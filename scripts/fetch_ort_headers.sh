#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ API headers (API 1.21) without installing anything on the system.
#
# The onnxruntime wheel ships libonnxruntime.so but no headers. Debian 13 ("trixie") packages them
# as libonnxruntime-dev. This script points a *private* apt configuration (its own sources list,
# state and cache directories under build/) at the trixie suite of the Debian mirror this machine
# already uses, downloads that one package and unpacks it with `dpkg -x` into build/ort-headers/.
# Nothing under /etc or /var is touched.
#
# Environment:
#   ORT_INCLUDE_DIR  headers are already available there (a directory holding
#                    onnxruntime_cxx_api.h); nothing is fetched.
#   DEBIAN_MIRROR    Debian archive URI to use instead of the one found in the apt sources.
#   DEBIAN_KEYRING   keyring verifying the index (default /usr/share/keyrings/debian-archive-keyring.gpg).
#
# Without apt-get and dpkg, or without access to a Debian package index, it stops with one message
# saying so and how to use an ONNX Runtime release instead (ORT_INCLUDE_DIR); apt's own output is
# kept in build/apt-trixie/apt.log.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${repo_root}/build"
dest="${build_dir}/ort-headers"
apt_dir="${build_dir}/apt-trixie"
package="libonnxruntime-dev"
suite="trixie"

header_in() { find "$1" -name onnxruntime_cxx_api.h -print -quit 2>/dev/null; }

# One message: what failed, what this step needs, and the way around it.
fail() {
    cat >&2 <<MSG
error: cannot fetch the ONNX Runtime headers: $1
This step needs apt-get and dpkg and access to a Debian package index (suite ${suite}, package ${package}).
Without them, use an ONNX Runtime release instead: download onnxruntime-linux-x64-<version>.tgz
(version 1.21 or newer) from the ONNX Runtime releases page, unpack it, and run
    export ORT_INCLUDE_DIR=/path/to/onnxruntime-linux-x64-<version>/include
    make setup        (or: .venv/bin/python -m export.build)
MSG
    exit 1
}

if [[ -n "${ORT_INCLUDE_DIR:-}" ]]; then
    if [[ -f "${ORT_INCLUDE_DIR}/onnxruntime_cxx_api.h" ]]; then
        echo "ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR} already holds the headers; nothing to fetch."
        exit 0
    fi
    echo "error: ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR} has no onnxruntime_cxx_api.h; point it at the include/ folder of an ONNX Runtime release (1.21 or newer), or unset it to fetch the headers" >&2
    exit 1
fi

if [[ -n "$(header_in "${dest}")" ]]; then
    echo "headers already present: $(dirname "$(header_in "${dest}")")"
    exit 0
fi

for tool in apt-get dpkg; do
    command -v "${tool}" >/dev/null 2>&1 || fail "${tool} is not installed (this is not a Debian-based system)."
done

# The Debian archive URI configured on this machine (deb822 *.sources or one-line sources.list).
find_debian_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        awk '
            /^[[:space:]]*$/ { if (uri != "" && suites ~ /(bookworm|trixie|stable)([[:space:]]|$)/ && uri !~ /security/) { print uri; exit } uri = ""; suites = ""; next }
            /^URIs:/    { uri = $2 }
            /^Suites:/  { sub(/^Suites:[[:space:]]*/, ""); suites = $0 }
            END { if (uri != "" && suites ~ /(bookworm|trixie|stable)([[:space:]]|$)/ && uri !~ /security/) print uri }
        ' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] || continue
        awk '$1 == "deb" && $0 !~ /security/ && $0 ~ /(bookworm|trixie|stable)/ {
                 for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f"
    done
}

mirror="${DEBIAN_MIRROR:-$(find_debian_mirror | head -n 1)}"
if [[ -z "${mirror}" ]]; then
    fail "no Debian mirror found in /etc/apt/sources* and DEBIAN_MIRROR is not set."
fi

keyring="${DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}"
if [[ ! -f "${keyring}" ]]; then
    fail "${keyring} is missing (package debian-archive-keyring), so the ${suite} index cannot be verified."
fi

mkdir -p "${apt_dir}/lists/partial" "${apt_dir}/cache/archives/partial" "${apt_dir}/etc/preferences.d" \
         "${apt_dir}/etc/sources.list.d" "${apt_dir}/download"
echo "deb [signed-by=${keyring}] ${mirror} ${suite} main" > "${apt_dir}/etc/sources.list"
: > "${apt_dir}/status"

arch="$(dpkg --print-architecture)"
apt_options=(
    -o "Dir::Etc::SourceList=${apt_dir}/etc/sources.list"
    -o "Dir::Etc::SourceParts=${apt_dir}/etc/sources.list.d"
    -o "Dir::Etc::Preferences=${apt_dir}/etc/preferences"
    -o "Dir::Etc::PreferencesParts=${apt_dir}/etc/preferences.d"
    -o "Dir::State=${apt_dir}"
    -o "Dir::State::Lists=${apt_dir}/lists"
    -o "Dir::State::status=${apt_dir}/status"
    -o "Dir::Cache=${apt_dir}/cache"
    -o "APT::Architecture=${arch}"
    -o "APT::Architectures=${arch}"
    -o "Debug::NoLocking=1"
    -o "APT::Sandbox::User=$([[ ${EUID} -eq 0 ]] && echo root || id -un)"
)

log="${apt_dir}/apt.log"
echo "fetching the ${suite} package index from ${mirror} (private apt state in ${apt_dir})"
# Error-Mode=any: an index that cannot be fetched is an error, not a warning.
if ! apt-get "${apt_options[@]}" -o APT::Update::Error-Mode=any -q update >"${log}" 2>&1; then
    fail "the Debian package index at ${mirror} (${suite}) could not be read (no network access to it?); apt's output is in ${log}."
fi
if ! (cd "${apt_dir}/download" && rm -f ./*.deb && apt-get "${apt_options[@]}" -q download "${package}") >>"${log}" 2>&1; then
    fail "${package} could not be downloaded from ${mirror} (${suite}); apt's output is in ${log}."
fi

deb="$(ls "${apt_dir}"/download/${package}_*.deb 2>/dev/null | head -n 1)"
[[ -n "${deb}" ]] || fail "apt-get reported success but left no ${package}_*.deb in ${apt_dir}/download."
rm -rf "${dest}"
mkdir -p "${dest}"
dpkg -x "${deb}" "${dest}" || fail "dpkg could not unpack ${deb}."

header="$(header_in "${dest}")"
if [[ -z "${header}" ]]; then
    fail "${deb} unpacked but holds no onnxruntime_cxx_api.h."
fi
echo "ONNX Runtime headers: $(dirname "${header}") (from $(basename "${deb}"))"
