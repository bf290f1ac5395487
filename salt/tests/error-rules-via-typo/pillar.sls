autoattach:
  rules_via: features
