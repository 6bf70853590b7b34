"""The library the stages share: params, data formats and loading, architectures, the
training loop and its parts, devices, saved models and safe output writing."""
