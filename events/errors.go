package events

import (
	"errors"
	"fmt"
)

//go:generate go run ../schemas/errgen -in ../schemas/errors.json -out errors_gen.go

// Code is a stable error code from the catalog in schemas/errors.json.
type Code int

type codeInfo struct {
	name        string
	description string
}

// Name is the code's stable name, e.g. "vm_not_found".
func (c Code) Name() string {
	if info, ok := catalog[c]; ok {
		return info.name
	}
	return fmt.Sprintf("code_%d", int(c))
}

// Description says what the code means, from the catalog.
func (c Code) Description() string { return catalog[c].description }

// Known tells whether c is in the catalog.
func (c Code) Known() bool {
	_, ok := catalog[c]
	return ok
}

// Codes lists the catalog's codes.
func Codes() []Code {
	out := make([]Code, 0, len(catalog))
	for c := range catalog {
		out = append(out, c)
	}
	return out
}

// Errorf makes a Fault with a catalog code and a message a person can act on.
func Errorf(code Code, format string, args ...any) *Fault {
	return &Fault{Code: code, Name: code.Name(), Message: fmt.Sprintf(format, args...)}
}

// FaultOf finds the Fault in err's chain, or wraps err as an internal one.
func FaultOf(err error) *Fault {
	var f *Fault
	if errors.As(err, &f) {
		return f
	}
	return Errorf(CodeInternal, "%v", err)
}

// Is matches Faults by code, so errors.Is(err, Errorf(CodeVMNotFound, ""))
// holds for any vm_not_found fault.
func (f *Fault) Is(target error) bool {
	t, ok := target.(*Fault)
	return ok && t.Code == f.Code
}
