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

// InitTLS makes, in dir, a CA and a server certificate it signs, for
// localhost, the loopback addresses, this machine's name and names, unless
// they exist. Bring your own by replacing server.pem and server-key.pem
// (and ca.pem, which clients are given).
func InitTLS(dir string, names []string) (made bool, err error) {
	if _, err := os.Stat(filepath.Join(dir, serverCertFile)); err == nil {
		return false, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return false, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return false, err
	}
	now := time.Now()
	ca := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: "Loom bus CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(caValidity),
		IsCA: true, BasicConstraintsValid: true, MaxPathLen: 0, MaxPathLenZero: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		return false, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return false, err
	}
	host, _ := os.Hostname()
	leaf := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: "Loom bus"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(serverValidity),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
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
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return false, err
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		return false, err
	}
	caKeyDER, err := x509.MarshalPKCS8PrivateKey(caKey)
	if err != nil {
		return false, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return false, err
	}
	// The key files first: a crash leaves no certificate without its key.
	for _, f := range []struct {
		name, block string
		der         []byte
		secret      bool
	}{
		{caKeyFile, "PRIVATE KEY", caKeyDER, true},
		{serverKeyFile, "PRIVATE KEY", keyDER, true},
		{caCertFile, "CERTIFICATE", caDER, false},
		{serverCertFile, "CERTIFICATE", leafDER, false},
	} {
		data := pem.EncodeToMemory(&pem.Block{Type: f.block, Bytes: f.der})
		path := filepath.Join(dir, f.name)
		if f.secret {
			_ = os.Remove(path)
			err = secretfile.WriteNew(path, data, 0o600)
		} else {
			err = os.WriteFile(path, data, 0o644)
		}
		if err != nil {
			return false, err
		}
	}
	return true, nil
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
