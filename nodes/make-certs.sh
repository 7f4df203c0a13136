#!/usr/bin/env bash
# fedgen study PKI: a study CA, the aggregator's TLS certificate, and one ECDSA key pair per site.
#
# Needs only `openssl` (1.1.1 or 3.x) and `ssh-keygen` (OpenSSH), both standard on Linux servers.
#
#   make-certs.sh ca     [--dir DIR] [--name NAME] [--days N]
#       Create the study CA: DIR/ca.pem (give to every site and to the aggregator) and
#       DIR/ca.key (the CA's private key: keep it offline; it is only needed to issue or
#       renew the aggregator certificate).
#   make-certs.sh server [--dir DIR] --host NAME_OR_IP [--host ...] [--days N]
#       Issue the aggregator's TLS certificate, signed by the CA in DIR: DIR/server.pem and
#       DIR/server.key. Give every DNS name or IP address the sites use to reach the
#       aggregator; 127.0.0.1, ::1 and localhost are always added (the aggregator's own
#       processes connect to it on loopback). Running it again renews the certificate.
#   make-certs.sh site   [--dir DIR] SITE
#       Create SITE's node authentication key pair (ECDSA P-384, OpenSSH format):
#       DIR/sites/SITE/node.key (private: stays at the site) and DIR/sites/SITE/node.key.pub
#       (public: registered at the aggregator). Prefer running this, or `fedgen node init`
#       (which does the same), ON the site's server so the private key never travels.
#   make-certs.sh show   [--dir DIR]
#       Print subjects, names and expiry dates of what DIR holds.
#
# DIR defaults to ./pki. Existing keys are never overwritten (remove them first to replace).
set -euo pipefail

die() { echo "make-certs.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

command -v openssl >/dev/null 2>&1 || die "openssl not found (install the openssl package)"

cmd="${1:-}"
[ -n "$cmd" ] || usage 1
shift
dir="pki"
name="fedgen study CA"
days=""
hosts=()
site=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) [ $# -ge 2 ] || die "--dir needs a value"; dir="$2"; shift 2 ;;
        --name) [ $# -ge 2 ] || die "--name needs a value"; name="$2"; shift 2 ;;
        --days) [ $# -ge 2 ] || die "--days needs a value"; days="$2"; shift 2 ;;
        --host) [ $# -ge 2 ] || die "--host needs a value"; hosts+=("$2"); shift 2 ;;
        -h|--help) usage 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$site" ] || die "unexpected argument $1"; site="$1"; shift ;;
    esac
done
if [ -n "$days" ]; then
    [[ "$days" =~ ^[0-9]+$ ]] && [ "$days" -ge 1 ] || die "--days must be a positive whole number"
fi

umask 077
mkdir -p "$dir"

is_ip() { [[ "$1" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$1" == *:* ]]; }

make_ca() {
    [ ! -e "$dir/ca.key" ] || die "$dir/ca.key already exists (a study has one CA; remove it to start over)"
    local d="${days:-3650}"
    openssl ecparam -name secp384r1 -genkey -noout -out "$dir/ca.key" 2>/dev/null
    openssl req -x509 -new -sha384 -key "$dir/ca.key" -days "$d" -subj "/CN=${name}" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" \
        -out "$dir/ca.pem"
    chmod 600 "$dir/ca.key"
    chmod 644 "$dir/ca.pem"
    echo "CA certificate: $dir/ca.pem (valid $d days; copy to the aggregator and every site)"
    echo "CA private key: $dir/ca.key (keep offline; needed only to issue/renew the server certificate)"
}

make_server() {
    [ -f "$dir/ca.key" ] && [ -f "$dir/ca.pem" ] || die "no CA in $dir (run: $0 ca --dir $dir)"
    [ ${#hosts[@]} -ge 1 ] || die "give the aggregator's name(s) or address(es): --host aggregator.example.org"
    local d="${days:-825}"
    local san="" h entry
    for h in "${hosts[@]}" localhost 127.0.0.1 ::1; do
        if is_ip "$h"; then entry="IP:$h"; else entry="DNS:$h"; fi
        case ",$san" in *",$entry,"*) ;; *) san+="$entry," ;; esac
    done
    san="${san%,}"
    local tmp
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/server.key" 2>/dev/null
    openssl req -new -sha256 -key "$tmp/server.key" -subj "/CN=${hosts[0]}" -out "$tmp/server.csr"
    cat > "$tmp/ext.cnf" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
subjectAltName=$san
EOF
    openssl x509 -req -sha384 -in "$tmp/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -CAserial "$dir/ca.srl" -days "$d" -extfile "$tmp/ext.cnf" \
        -out "$tmp/server.pem" 2>/dev/null
    # Replace (renew) atomically: a running aggregator keeps its old files until restarted.
    mv -f "$tmp/server.key" "$dir/server.key"
    mv -f "$tmp/server.pem" "$dir/server.pem"
    chmod 600 "$dir/server.key"
    chmod 644 "$dir/server.pem"
    echo "server certificate: $dir/server.pem (valid $d days; names: ${san//,/, })"
    echo "server private key: $dir/server.key (stays on the aggregator)"
}

make_site() {
    [ -n "$site" ] || die "give the site name: $0 site [--dir DIR] SITE"
    [[ "$site" =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ ]] || die "site name '$site': use letters, digits, '-' or '_'"
    command -v ssh-keygen >/dev/null 2>&1 || die "ssh-keygen not found (install openssh-client, or use 'fedgen node init' at the site)"
    local sd="$dir/sites/$site"
    [ ! -e "$sd/node.key" ] || die "$sd/node.key already exists (remove it to make a new key pair)"
    mkdir -p "$sd"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedgen-site-$site" -f "$sd/node.key"
    chmod 600 "$sd/node.key"
    chmod 644 "$sd/node.key.pub"
    echo "site $site private key: $sd/node.key (stays at the site)"
    echo "site $site public key:  $sd/node.key.pub (register it at the aggregator)"
}

show() {
    local f
    for f in "$dir/ca.pem" "$dir/server.pem"; do
        [ -f "$f" ] || continue
        echo "== $f"
        openssl x509 -in "$f" -noout -subject -issuer -enddate
        openssl x509 -in "$f" -noout -ext subjectAltName 2>/dev/null | tail -n +2 || true
    done
    if [ -d "$dir/sites" ]; then
        for f in "$dir"/sites/*/node.key.pub; do
            [ -f "$f" ] || continue
            echo "== $f"
            if command -v ssh-keygen >/dev/null 2>&1; then ssh-keygen -l -f "$f"; else cat "$f"; fi
        done
    fi
}

case "$cmd" in
    ca) make_ca ;;
    server) make_server ;;
    site) make_site ;;
    show) show ;;
    -h|--help|help) usage 0 ;;
    *) die "unknown command '$cmd' (ca, server, site, show; see --help)" ;;
esac
