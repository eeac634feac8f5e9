package lab

import "context"

// Launch starts the peer like Start but returns as soon as the process runs, without
// waiting for `weft status` to answer: a lab of many hosts starts its peers together and
// checks readiness itself, more cheaply than one CLI process per host every 50 ms.
func (h *Host) Launch() error { return h.start(context.Background(), false) }
