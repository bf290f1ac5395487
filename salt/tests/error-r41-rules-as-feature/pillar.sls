autoattach:
  rules: |
    SUBSYSTEM=="block", ATTACH="work"
