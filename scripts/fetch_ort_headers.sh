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
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${repo_root}/build"
dest="${build_dir}/ort-headers"
apt_dir="${build_dir}/apt-trixie"
package="libonnxruntime-dev"
suite="trixie"

header_in() { find "$1" -name onnxruntime_cxx_api.h -print -quit 2>/dev/null; }

if [[ -n "${ORT_INCLUDE_DIR:-}" ]]; then
    if [[ -f "${ORT_INCLUDE_DIR}/onnxruntime_cxx_api.h" ]]; then
        echo "ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR} already holds the headers; nothing to fetch."
        exit 0
    fi
    echo "error: ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR} has no onnxruntime_cxx_api.h" >&2
    exit 1
fi

if [[ -n "$(header_in "${dest}")" ]]; then
    echo "headers already present: $(dirname "$(header_in "${dest}")")"
    exit 0
fi

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
    cat >&2 <<MSG
error: no Debian mirror found in /etc/apt/sources* and DEBIAN_MIRROR is not set.
Either set DEBIAN_MIRROR to a Debian archive URI, or download the headers of an ONNX Runtime
release (the include/ folder of its onnxruntime-linux-x64 archive) and set ORT_INCLUDE_DIR to it.
MSG
    exit 1
fi

keyring=/usr/share/keyrings/debian-archive-keyring.gpg
if [[ ! -f "${keyring}" ]]; then
    echo "error: ${keyring} is missing (package debian-archive-keyring); cannot verify ${suite}." >&2
    exit 1
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

echo "fetching the ${suite} package index from ${mirror} (private apt state in ${apt_dir})"
apt-get "${apt_options[@]}" -q update
(cd "${apt_dir}/download" && rm -f ./*.deb && apt-get "${apt_options[@]}" -q download "${package}")

deb="$(ls "${apt_dir}"/download/${package}_*.deb | head -n 1)"
rm -rf "${dest}"
mkdir -p "${dest}"
dpkg -x "${deb}" "${dest}"

header="$(header_in "${dest}")"
if [[ -z "${header}" ]]; then
    echo "error: ${deb} unpacked but holds no onnxruntime_cxx_api.h" >&2
    exit 1
fi
echo "ONNX Runtime headers: $(dirname "${header}") (from $(basename "${deb}"))"
