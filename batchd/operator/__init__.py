"""The operator's side: the operations layer (ops), the control socket (control) and
the request/response models it shares with the light client (protocol)."""
