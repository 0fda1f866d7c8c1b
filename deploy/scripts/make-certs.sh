#!/usr/bin/env bash
# Makes what Zenith's TLS and token Secrets hold, with openssl, into OUTDIR:
#   ca.crt ca.key                  a private CA (keep ca.key offline)
#   coordinator.crt coordinator.key  the coordinator's server certificate
#   worker.crt worker.key          the workers' client certificate (mutual TLS)
#   user.crt user.key              a client certificate for zenithctl (mutual TLS: with
#                                  --tls-client-ca the coordinator asks every client for one)
#   token                          the bearer token for zenithctl and other API clients
# usage: deploy/scripts/make-certs.sh OUTDIR [NAMESPACE] [EXTRA_SAN ...]
# EXTRA_SAN: more names the coordinator is reached by, as DNS:name or IP:address (say the
# LoadBalancer's address). localhost and 127.0.0.1 are always in, for kubectl port-forward.
set -euo pipefail
out=${1:?usage: make-certs.sh OUTDIR [NAMESPACE] [EXTRA_SAN ...]}
ns=${2:-zenith}
shift $(( $# >= 2 ? 2 : 1 ))
days=${ZENITH_CERT_DAYS:-365}
mkdir -p "$out"
umask 077

sans="DNS:zenith-coordinator,DNS:zenith-coordinator.$ns,DNS:zenith-coordinator.$ns.svc"
sans="$sans,DNS:zenith-coordinator.$ns.svc.cluster.local,DNS:localhost,IP:127.0.0.1"
for extra in "$@"; do sans="$sans,$extra"; done

# The CA.
openssl req -x509 -newkey rsa:3072 -sha256 -nodes -days "$days" \
  -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=zenith-ca" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  2>/dev/null

# A key, a request and a certificate signed by the CA: sign NAME CN EXTENSIONS.
sign() {
  openssl req -newkey rsa:3072 -sha256 -nodes -keyout "$out/$1.key" -out "$out/$1.csr" \
    -subj "/CN=$2" 2>/dev/null
  printf '%s\n' "$3" >"$out/$1.ext"
  openssl x509 -req -sha256 -days "$days" -in "$out/$1.csr" -CA "$out/ca.crt" \
    -CAkey "$out/ca.key" -CAcreateserial -out "$out/$1.crt" -extfile "$out/$1.ext" 2>/dev/null
  rm -f "$out/$1.csr" "$out/$1.ext"
}
sign coordinator zenith-coordinator \
  "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$sans"
sign worker zenith-worker \
  "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
sign user zenith-user \
  "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
rm -f "$out/ca.srl"

# The token: 256 random bits, hex, no newline.
openssl rand -hex 32 | tr -d '\n' >"$out/token"
chmod 0644 "$out/ca.crt" "$out/coordinator.crt" "$out/worker.crt" "$out/user.crt"
echo "make-certs: CA, coordinator, worker and user certificates and a token in $out"
