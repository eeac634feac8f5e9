package mesh

import "errors"

// Sentinel errors. Errors returned by this package wrap one of these where it
// applies; match them with errors.Is.
var (
	// ErrInvalidConfig: a Config field is out of range or malformed.
	ErrInvalidConfig = errors.New("mesh: invalid config")
	// ErrBadMetadata: metadata could not be encoded (invalid or too large)
	// or decoded (garbage, truncated, unknown version).
	ErrBadMetadata = errors.New("mesh: bad metadata")
	// ErrBadEnvelope: a channel message or push/pull state was not a valid
	// envelope.
	ErrBadEnvelope = errors.New("mesh: bad channel envelope")
	// ErrPasswordMismatch: a join was refused because this peer and the
	// remote one use different gossip passwords (or only one uses one).
	ErrPasswordMismatch = errors.New("mesh: gossip password mismatch")
	// ErrNotStarted: the operation needs Start to have succeeded.
	ErrNotStarted = errors.New("mesh: not started")
	// ErrAlreadyStarted: Start was called twice.
	ErrAlreadyStarted = errors.New("mesh: already started")
	// ErrClosed: the Mesh was closed.
	ErrClosed = errors.New("mesh: closed")
	// ErrChannelExists: RegisterChannel was called twice with one name.
	ErrChannelExists = errors.New("mesh: channel already registered")
	// ErrUnknownChannel: Broadcast on a channel that is not registered.
	ErrUnknownChannel = errors.New("mesh: unknown channel")
	// ErrMessageTooLarge: a broadcast does not fit in one gossip packet.
	ErrMessageTooLarge = errors.New("mesh: message too large")
)
