autoattach:
  allow:
    - {source: "sys-usb\\nwork", class: block, target: work}
