autoattach:
  allow: []
