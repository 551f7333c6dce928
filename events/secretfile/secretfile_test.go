package secretfile

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestWriteNewAndRead(t *testing.T) {
	path := filepath.Join(t.TempDir(), "secret")
	if err := WriteNew(path, []byte("s3cret"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteNew(path, []byte("other"), 0o600); err == nil {
		t.Fatal("WriteNew wrote over an existing file")
	}
	if data, err := Read(path, "key"); err != nil || string(data) != "s3cret" {
		t.Fatalf("Read = %q, %v", data, err)
	}
	if err := os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	_, err := Read(path, "key")
	if err == nil || !strings.Contains(err.Error(), "chmod 600") || strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("a file its group may read: %v", err)
	}
}
