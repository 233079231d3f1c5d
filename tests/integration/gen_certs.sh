#!/bin/sh
# gen_certs.sh DIR - per-run test PKI for the integration tests (EC P-256; never committed).
#   ca.pem/ca.key                 test CA
#   leaf.pem/leaf.key             SAN DNS:localhost, login.entra.test, hosts.entra.test (the image
#                                 tests resolve those), IP:127.0.0.1, IP:::1 (signed by the CA)
#   wronghost.pem/wronghost.key   SAN DNS:wrong-host.invalid only                (signed by the CA)
#   rogue-ca.pem/rogue-ca.key     a second, unrelated CA
#   rogue.pem/rogue.key           the same names as leaf.pem                     (signed by the rogue CA)
#   aks-ca.pem, aks-ca2.pem       two CAs of an AKS identity binding's token proxy (its CA rotates)
#   aks-proxy.pem/.key            SAN DNS:tokenproxy.aks.test                    (signed by aks-ca)
#   aks-proxy2.pem/.key           SAN DNS:tokenproxy.aks.test                    (signed by aks-ca2)
#   aks-local.pem/.key            SAN DNS:localhost                              (signed by aks-ca)
# mbedTLS 2.28 ignores IP SANs, so the daemon always connects to the name "localhost".
set -eu

dir=${1:?usage: gen_certs.sh DIR}
mkdir -p "$dir"
cd "$dir"

cat >openssl.cnf <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
subjectAltName = ${ENV::SAN}
EOF
export SAN=DNS:unused # every command reads the whole configuration: newleaf sets the real one

newkey() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
    chmod 600 "$1"
}

# newca NAME CN
newca() {
    newkey "$1.key"
    openssl req -config openssl.cnf -x509 -new -key "$1.key" -sha256 -days 3 \
        -subj "/CN=$2" -extensions v3_ca -out "$1.pem"
}

# newleaf NAME CN CA SUBJECT_ALT_NAMES
newleaf() {
    newkey "$1.key"
    openssl req -config openssl.cnf -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
    SAN=$4 openssl x509 -req -in "$1.csr" -CA "$3.pem" -CAkey "$3.key" -set_serial "0x$(openssl rand -hex 8)" \
        -days 2 -sha256 -extfile openssl.cnf -extensions v3_server -out "$1.pem" 2>/dev/null
    rm -f "$1.csr"
}

LOCAL="DNS:localhost,DNS:login.entra.test,DNS:hosts.entra.test,IP:127.0.0.1,IP:::1"

newca ca "imdsd integration test CA"
newleaf leaf localhost ca "$LOCAL"
newleaf wronghost wrong-host.invalid ca DNS:wrong-host.invalid
newca rogue-ca "imdsd rogue test CA"
newleaf rogue localhost rogue-ca "$LOCAL"
newca aks-ca "imdsd test AKS identity binding CA"
newca aks-ca2 "imdsd test AKS identity binding CA (rotated)"
newleaf aks-proxy tokenproxy.aks.test aks-ca DNS:tokenproxy.aks.test
newleaf aks-proxy2 tokenproxy.aks.test aks-ca2 DNS:tokenproxy.aks.test
newleaf aks-local localhost aks-ca DNS:localhost
rm -f openssl.cnf

openssl verify -CAfile ca.pem leaf.pem wronghost.pem >/dev/null
openssl verify -CAfile rogue-ca.pem rogue.pem >/dev/null
openssl verify -CAfile aks-ca.pem aks-proxy.pem aks-local.pem >/dev/null
openssl verify -CAfile aks-ca2.pem aks-proxy2.pem >/dev/null
