"""Control plane: owns requests; never holds a tensor beyond token ids."""
