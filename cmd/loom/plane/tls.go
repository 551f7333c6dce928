package plane

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/loomctl/loom/events/secretfile"
)

// TLS files beside the credentials: a CA that signs the server's
// certificate, and the certificate with its key. Clients trust ca.pem.
const (
	caCertFile     = "ca.pem"
	caKeyFile      = "ca-key.pem"
	serverCertFile = "server.pem"
	serverKeyFile  = "server-key.pem"
)

// Validity of what InitTLS makes.
const (
	caValidity     = 10 * 365 * 24 * time.Hour
	serverValidity = 2 * 365 * 24 * time.Hour
)

// CAFile is the CA certificate in a credentials directory: what clients
// of its server trust.
func CAFile(dir string) string { return filepath.Join(dir, caCertFile) }

// InitTLS makes, in dir, the server's certificate for localhost, the
// loopback addresses, this machine's name and names, unless it exists,
// signed by dir's CA, which it makes first if there is none. Each server
// of a cluster has its own certificate from one CA: copy the first
// server's credentials directory but server.pem and server-key.pem to the
// new server, and run loom init there. Bring your own by replacing server.pem and server-key.pem (and
// ca.pem, which clients are given).
func InitTLS(dir string, names []string) (made bool, err error) {
	if _, err := os.Stat(filepath.Join(dir, serverCertFile)); err == nil {
		return false, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return false, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, err
	}
	ca, caKey, err := loadCA(dir)
	if errors.Is(err, fs.ErrNotExist) {
		ca, caKey, err = makeCA(dir)
	}
	if err != nil {
		return false, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return false, err
	}
	now := time.Now()
	host, _ := os.Hostname()
	leaf := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: "Loom bus"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(serverValidity),
		KeyUsage: x509.KeyUsageDigitalSignature,
		// A server dials its peers' routes too, showing the same
		// certificate: it is a client of theirs.
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:    []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	for _, n := range append([]string{host}, names...) {
		if ip := net.ParseIP(n); ip != nil {
			leaf.IPAddresses = append(leaf.IPAddresses, ip)
		} else if n != "" {
			leaf.DNSNames = append(leaf.DNSNames, n)
		}
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, ca, &key.PublicKey, caKey)
	if err != nil {
		return false, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return false, err
	}
	// The key first: a crash leaves no certificate without its key.
	if err := writePEM(filepath.Join(dir, serverKeyFile), "PRIVATE KEY", keyDER, true); err != nil {
		return false, err
	}
	return true, writePEM(filepath.Join(dir, serverCertFile), "CERTIFICATE", leafDER, false)
}

// makeCA makes dir's CA: its key, then its certificate.
func makeCA(dir string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: "Loom bus CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(caValidity),
		IsCA: true, BasicConstraintsValid: true, MaxPathLen: 0, MaxPathLenZero: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(caKey)
	if err != nil {
		return nil, nil, err
	}
	if err := writePEM(filepath.Join(dir, caKeyFile), "PRIVATE KEY", keyDER, true); err != nil {
		return nil, nil, err
	}
	if err := writePEM(filepath.Join(dir, caCertFile), "CERTIFICATE", caDER, false); err != nil {
		return nil, nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	return ca, caKey, err
}

// loadCA reads dir's CA certificate and key; fs.ErrNotExist if it has
// neither.
func loadCA(dir string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	certPEM, certErr := os.ReadFile(filepath.Join(dir, caCertFile))
	_, keyErr := os.Stat(filepath.Join(dir, caKeyFile))
	switch {
	case errors.Is(certErr, fs.ErrNotExist) && errors.Is(keyErr, fs.ErrNotExist):
		return nil, nil, fs.ErrNotExist
	case certErr != nil:
		return nil, nil, fmt.Errorf("CA in %s: %w", dir, certErr)
	case keyErr != nil:
		return nil, nil, fmt.Errorf("CA in %s: %s without its key: %w", dir, caCertFile, keyErr)
	}
	keyPEM, err := secretfile.Read(filepath.Join(dir, caKeyFile), "CA key")
	if err != nil {
		return nil, nil, err
	}
	defer clear(keyPEM)
	certBlock, _ := pem.Decode(certPEM)
	keyBlock, _ := pem.Decode(keyPEM)
	if certBlock == nil || keyBlock == nil {
		return nil, nil, fmt.Errorf("CA in %s: %s or %s is not PEM", dir, caCertFile, caKeyFile)
	}
	ca, err := x509.ParseCertificate(certBlock.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("CA in %s: %w", dir, err)
	}
	parsed, err := x509.ParsePKCS8PrivateKey(keyBlock.Bytes)
	key, ok := parsed.(*ecdsa.PrivateKey)
	if err != nil || !ok || !key.PublicKey.Equal(ca.PublicKey) {
		return nil, nil, fmt.Errorf("CA in %s: %s is not the key of %s", dir, caKeyFile, caCertFile)
	}
	return ca, key, nil
}

// writePEM writes der as a PEM block to path: a secret one as a new file
// only its owner may read.
func writePEM(path, block string, der []byte, secret bool) error {
	data := pem.EncodeToMemory(&pem.Block{Type: block, Bytes: der})
	if !secret {
		return os.WriteFile(path, data, 0o644)
	}
	_ = os.Remove(path)
	return secretfile.WriteNew(path, data, 0o600)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail
	}
	return n
}

// ServerTLS is the embedded server's TLS configuration from dir.
func ServerTLS(dir string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, serverCertFile), filepath.Join(dir, serverKeyFile))
	if err != nil {
		return nil, fmt.Errorf("server certificate in %s: %w", dir, err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

// RouteTLS is the TLS of the routes between the servers of a cluster,
// from dir: each side shows its server certificate and verifies the
// other's against the CA, so only servers with a certificate from it join.
func RouteTLS(dir string) (*tls.Config, error) {
	cfg, err := ServerTLS(dir)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(cfg.Certificates[0].Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("server certificate in %s: %w", dir, err)
	}
	if !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		return nil, fmt.Errorf("server certificate in %s is for serving only, and a server dials its peers' routes too: "+
			"remove %s and %s and run loom init to make one that may (or bring one with client auth usage)", dir, serverCertFile, serverKeyFile)
	}
	caPEM, err := os.ReadFile(CAFile(dir))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%s holds no certificate", CAFile(dir))
	}
	cfg.RootCAs, cfg.ClientCAs, cfg.ClientAuth = pool, pool, tls.RequireAndVerifyClientCert
	return cfg, nil
}
