"""The `qlm` router: configuration, admission of the request contract, dispatch to engines."""
