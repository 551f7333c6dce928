// Package secretfile writes and reads the files that hold Loom's secrets:
// the seal key, nkey seeds, host keys, TLS keys. A secret file is written
// once, never over an existing file, and synced before it is used; it is
// read only if nobody but its owner may read it. The package imports
// nothing of Loom's.
package secretfile

import (
	"fmt"
	"os"
)

// WriteNew writes data to a file that must not exist yet, with mode, and
// syncs it.
func WriteNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

// Read reads a secret file, refusing one that its group or others may
// read. what names the file in errors, which never hold its contents.
func Read(path, what string) ([]byte, error) {
	info, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if info.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s %s: mode %v lets others read it; chmod 600 it", what, path, info.Mode().Perm())
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return data, nil
}
