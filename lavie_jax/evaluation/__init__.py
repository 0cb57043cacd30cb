"""Video metrics: FVD (I3D features, Frechet distance), IS and CLIPSIM; host-side math in float64."""
